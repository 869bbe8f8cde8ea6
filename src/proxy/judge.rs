//! Judge threads: where a large query string whose verdict is not cached is classified, so the relay thread
//! that carries it keeps serving its other sessions meanwhile.
//!
//! A direction that meets such a message stops before it ([`super::flow::Frontend::pending`]); the relay
//! hands the job here, stops reading from that client, and feeds the message again when the job is done —
//! the verdict is in the cache by then. PostgreSQL's parser checks its own stack depth against the thread
//! it runs on; these threads get a generous stack.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// Query strings at least this long are judged on a judge thread when their verdict is not cached.
pub const OFFLOAD_BYTES: usize = 64 * 1024;

/// Work for a judge thread.
pub type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of judge threads fed from one queue. Dropping the pool ends them once the queue is empty.
pub(crate) struct JudgePool {
    tx: Mutex<mpsc::Sender<Job>>,
}

impl JudgePool {
    pub fn start(threads: usize) -> std::io::Result<JudgePool> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("stepgate-judge-{i}"))
                .stack_size(32 << 20)
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    match job {
                        // A panic (a bug) loses this judgement only; the session is fed again and judges
                        // on its own thread.
                        Ok(job) => {
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                        }
                        Err(_) => return,
                    }
                })?;
        }
        Ok(JudgePool { tx: Mutex::new(tx) })
    }

    /// Queues `job`; runs it on the calling thread if the pool is gone.
    pub fn submit(&self, job: Job) {
        let sent = self.tx.lock().unwrap_or_else(|p| p.into_inner()).send(job);
        if let Err(mpsc::SendError(job)) = sent {
            job();
        }
    }
}
