//! The console's commands, one file each. The build script (`build.rs`) lists the files of this folder:
//! each defines `pub(crate) static COMMAND` implementing [`super::command::Command`], and [`ALL`] holds
//! them all.

include!(concat!(env!("OUT_DIR"), "/console_commands.rs"));
