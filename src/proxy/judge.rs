//! Judge threads: where a large query string whose verdict is not cached is classified, so the relay thread
//! that carries it keeps serving its other sessions meanwhile.
//!
//! A direction that meets such a message stops before it ([`super::flow::Frontend::pending`]); the relay
//! hands the job here, stops reading from that client, and feeds the message again when the job is done —
//! the verdict is in the cache by then. PostgreSQL's parser checks its own stack depth against the thread
//! it runs on; these threads get a generous stack.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

/// Query strings at least this long are judged on a judge thread when their verdict is not cached.
pub const OFFLOAD_BYTES: usize = 64 * 1024;

/// Work for a judge thread.
pub type Job = Box<dyn FnOnce() + Send>;

/// What a [`MessageJob`] does with its message.
pub type MessageWork = Box<dyn FnOnce(&[u8]) + Send>;

/// Work on the message at the front of a session's buffer, for a judge thread. The message is not copied
/// for it: the relay freezes the buffer (it reads nothing more from that client until the job is done),
/// [`MessageJob::bind`]s the job to it, and takes the same memory back afterwards with [`reclaim`]. So a
/// large statement is held once while it is judged.
pub struct MessageJob {
    len: usize,
    run: MessageWork,
    /// It waits (for an approval, up to a rule's `wait_timeout`): it gets a thread of its own rather than
    /// one of the judge threads. Set, when no thread can be had, to make it end at once instead.
    waits: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl MessageJob {
    /// `run` is given the message (its first `len` bytes of the buffer).
    pub fn new(len: usize, run: MessageWork) -> MessageJob {
        MessageJob {
            len,
            run,
            waits: None,
        }
    }

    /// A job that waits (see [`JudgePool::submit_for`]); `no_thread` makes it end at once.
    pub fn waiting(
        len: usize,
        run: MessageWork,
        no_thread: Arc<std::sync::atomic::AtomicBool>,
    ) -> MessageJob {
        MessageJob {
            len,
            run,
            waits: Some(no_thread),
        }
    }

    /// For a job that waits: the flag that makes it end at once.
    pub fn waits(&self) -> Option<Arc<std::sync::atomic::AtomicBool>> {
        self.waits.clone()
    }

    /// The job for the judge threads, sharing `buffer` (whose front is the message). Its share is dropped
    /// when the job has run (or panicked).
    pub fn bind(self, buffer: &Bytes) -> Job {
        let msg = buffer.slice(..self.len.min(buffer.len()));
        let run = self.run;
        Box::new(move || run(&msg))
    }
}

/// A session's buffer back from a [`MessageJob`]: the same memory once the job's share is gone (it is, once
/// the job has run), a copy only if something still shares it.
pub fn reclaim(buffer: Bytes) -> BytesMut {
    buffer
        .try_into_mut()
        .unwrap_or_else(|shared| BytesMut::from(&shared[..]))
}

/// Messages at least this long give the allocator's free memory back to the system once they are judged.
pub const TRIM_AFTER_BYTES: usize = 1 << 20;

/// Gives the memory the allocator holds free back to the system. Judging a large statement makes several
/// short-lived copies of it inside PostgreSQL's parser and its tree; glibc keeps such freed blocks in its
/// arenas (its mmap threshold rises after the first large free), so without this a process that judged one
/// 16 MiB statement stayed ~75 MiB larger for good. Called after a message of [`TRIM_AFTER_BYTES`] or more, at
/// most once a second (a trim locks each arena in turn: a client sending large statements in a loop must not
/// make every other session wait on it).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free_memory() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let last = LAST.load(Ordering::Relaxed);
    if now <= last
        || LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    // SAFETY: malloc_trim takes no pointers; glibc locks each arena while it trims it.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators give large blocks back themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() {}

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

    /// Runs `job` (bound from a [`MessageJob`]) where it belongs: a waiting job on a thread of its own (it
    /// may wait for minutes and must not keep other sessions' statements from being judged), any other on
    /// the judge threads. A waiting job that gets no thread is told to end at once (`waits`), then runs on
    /// the judge threads for that one last round.
    pub fn submit_for(&self, waits: Option<Arc<std::sync::atomic::AtomicBool>>, job: Job) {
        let Some(no_thread) = waits else {
            return self.submit(job);
        };
        let job = std::sync::Arc::new(Mutex::new(Some(job)));
        let spawned = {
            let job = job.clone();
            std::thread::Builder::new()
                .name("stepgate-wait".into())
                .stack_size(32 << 20)
                .spawn(move || {
                    let job = job.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if let Some(job) = job {
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    }
                })
        };
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread for a statement that would wait for an approval: it is refused");
            no_thread.store(true, std::sync::atomic::Ordering::Release);
            let job = job.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(job) = job {
                self.submit(job);
            }
        }
    }

    /// Queues `job`; runs it on the calling thread if the pool is gone.
    pub fn submit(&self, job: Job) {
        let sent = self.tx.lock().unwrap_or_else(|p| p.into_inner()).send(job);
        if let Err(mpsc::SendError(job)) = sent {
            job();
        }
    }
}
