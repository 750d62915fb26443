//! Supervision of the tasks a process cannot live without (the swarm event loops).
//!
//! tokio catches a panic in a spawned task and ends only that task: a master or node whose
//! event loop panicked would keep running, deaf. [`spawn_critical`] runs such a task so that a
//! panic is logged and observable ([`CriticalTask::wait`], [`PanicWatch::panicked`]), and
//! [`exit_on_panic`] turns it into the end of the process with exit code
//! [`PANIC_EXIT_CODE`] — what binaries want; in-process tests watch instead.

use std::{future::Future, panic::AssertUnwindSafe};

use futures::FutureExt;
use tokio::{
    sync::watch,
    task::{AbortHandle, JoinHandle},
};

/// Exit code of a process whose critical task panicked (as Rust's own panic exit).
pub const PANIC_EXIT_CODE: i32 = 101;

/// A critical task panicked.
#[derive(Clone, Debug, thiserror::Error)]
#[error("task {task} panicked: {message}")]
pub struct TaskPanicked {
    /// The task's name.
    pub task: &'static str,
    /// The panic message.
    pub message: String,
}

/// A running critical task.
#[derive(Debug)]
pub struct CriticalTask {
    handle: JoinHandle<()>,
    watch: PanicWatch,
}

/// Resolves when a critical task panics. Cloneable.
#[derive(Clone, Debug)]
pub struct PanicWatch {
    rx: watch::Receiver<Option<TaskPanicked>>,
}

/// Spawns `fut` as the critical task `name`: a panic in it is caught, logged at error level
/// and reported to its [`PanicWatch`]es.
pub fn spawn_critical<F>(name: &'static str, fut: F) -> CriticalTask
where
    F: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = watch::channel(None);
    let handle = tokio::spawn(async move {
        if let Err(payload) = AssertUnwindSafe(fut).catch_unwind().await {
            let message = panic_message(payload.as_ref());
            tracing::error!(task = name, %message, "critical task panicked");
            let _ = tx.send(Some(TaskPanicked {
                task: name,
                message,
            }));
        }
    });
    CriticalTask {
        handle,
        watch: PanicWatch { rx },
    }
}

impl CriticalTask {
    /// A handle that cancels the task (a cancelled task is not a panic).
    pub fn abort_handle(&self) -> AbortHandle {
        self.handle.abort_handle()
    }

    /// Something that resolves if the task panics.
    pub fn watch(&self) -> PanicWatch {
        self.watch.clone()
    }

    /// Waits until the task ends: `Ok` if it returned or was cancelled, the panic otherwise.
    pub async fn wait(self) -> Result<(), TaskPanicked> {
        let _ = self.handle.await;
        match self.watch.rx.borrow().clone() {
            Some(p) => Err(p),
            None => Ok(()),
        }
    }
}

impl PanicWatch {
    /// Resolves with the panic if the task panics; never resolves if it ends otherwise.
    pub async fn panicked(&self) -> TaskPanicked {
        let mut rx = self.rx.clone();
        // An error means the task ended without panicking.
        let got = rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|p| p.clone());
        match got {
            Some(p) => p,
            None => std::future::pending().await,
        }
    }

    /// The panic, if the task has panicked by now.
    pub fn get(&self) -> Option<TaskPanicked> {
        self.rx.borrow().clone()
    }
}

/// Ends the process with [`PANIC_EXIT_CODE`] as soon as the watched task panics. For
/// binaries: returns the watcher task's handle (dropping it does not stop the watch).
pub fn exit_on_panic(watch: PanicWatch) -> JoinHandle<()> {
    tokio::spawn(async move {
        let p = watch.panicked().await;
        eprintln!("fatal: {p}; exiting");
        std::process::exit(PANIC_EXIT_CODE);
    })
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_panic_is_reported_and_a_normal_end_is_not() {
        let t = spawn_critical("boom", async { panic!("on purpose") });
        let w = t.watch();
        let p = tokio::time::timeout(Duration::from_secs(5), w.panicked())
            .await
            .expect("the panic is reported");
        assert_eq!(p.task, "boom");
        assert_eq!(p.message, "on purpose");
        assert!(t.wait().await.is_err());

        let t = spawn_critical("fine", async {});
        let w = t.watch();
        assert!(t.wait().await.is_ok());
        assert!(w.get().is_none());
        assert!(
            tokio::time::timeout(Duration::from_millis(50), w.panicked())
                .await
                .is_err(),
            "a task that ended normally never reads as panicked"
        );

        let t = spawn_critical("cancelled", std::future::pending());
        t.abort_handle().abort();
        assert!(t.wait().await.is_ok(), "cancelling is not a panic");
    }

    /// The child half of [`a_panicking_critical_task_ends_the_process_with_101`]: only does
    /// something when started by it.
    #[test]
    fn child_process_panics_its_critical_task() {
        if std::env::var_os("SHOAL_NET_PANIC_CHILD").is_none() {
            return;
        }
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let t = spawn_critical("event loop", async { panic!("child panic") });
            let _exit = exit_on_panic(t.watch());
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        // Reaching this point means the process did not exit: the parent sees exit code 0.
    }

    #[test]
    fn a_panicking_critical_task_ends_the_process_with_101() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "task::tests::child_process_panics_its_critical_task",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SHOAL_NET_PANIC_CHILD", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(PANIC_EXIT_CODE), "stderr: {stderr}");
        assert!(stderr.contains("child panic"), "stderr: {stderr}");
    }
}
