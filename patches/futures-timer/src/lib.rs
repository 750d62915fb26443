//! futures-timer's [`Delay`] on tokio's timer.
//!
//! crates.io's futures-timer runs its own timer thread. Every `Delay` made, reset or dropped is
//! pushed to that thread and wakes it, and libp2p makes one for every stream it negotiates and
//! every request it sends, at both ends. In a swarm moving small pieces those wake-ups were about
//! half of a node's `futex` calls. Here a `Delay` is a [`tokio::time::Sleep`] in the runtime
//! that made it, whose timer wheel that runtime's own threads turn when they park: registering
//! or dropping one takes the wheel's lock, and wakes a parked thread only when its deadline is
//! earlier than any the runtime was waiting for.
//!
//! A `Delay` made outside any tokio runtime is kept by a small fallback runtime of one thread,
//! started on first use. Unlike futures-timer's, a `Delay` is tied to the runtime that made it:
//! - that runtime must have its timer enabled (`enable_time` / `enable_all`, as `#[tokio::main]`
//!   and `#[tokio::test]` do), or making the `Delay` panics;
//! - polling it after that runtime has shut down panics (dropping it is fine);
//! - if that runtime is a current-thread one that is no longer being driven, it never fires;
//! - it follows that runtime's clock, so `tokio::time::pause` pauses it too.
//!
//! shoal builds and drives every swarm inside one multi-thread or test runtime that outlives
//! it, so none of these arise there.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::runtime::{Handle, Runtime};
use tokio::time::{Instant, Sleep};

/// A future that completes at a set time: [`Delay::new`]'s duration after it was made, or
/// [`Delay::reset`]'s after the last reset. Once complete, it completes again whenever polled
/// until reset (after a yield to the scheduler if the task has used up tokio's budget).
pub struct Delay {
    sleep: Pin<Box<Sleep>>,
}

impl Delay {
    /// A `Delay` that completes `dur` from now.
    pub fn new(dur: Duration) -> Delay {
        // Outside any runtime, made in the fallback's.
        let _in_fallback = Handle::try_current().is_err().then(|| fallback().enter());
        Delay {
            sleep: Box::pin(tokio::time::sleep_until(deadline(dur))),
        }
    }

    /// Completes `dur` from now instead, whether or not it had completed.
    pub fn reset(&mut self, dur: Duration) {
        self.sleep.as_mut().reset(deadline(dur));
    }
}

impl Future for Delay {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.sleep.as_mut().poll(cx)
    }
}

impl fmt::Debug for Delay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delay")
            .field("deadline", &self.sleep.deadline())
            .finish()
    }
}

/// `dur` from now, at most about thirty years (as tokio's `sleep`), so that it cannot
/// overflow.
fn deadline(dur: Duration) -> Instant {
    Instant::now() + dur.min(FAR_FUTURE)
}

const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// The runtime that keeps `Delay`s made outside any tokio runtime: one thread, timer only.
fn fallback() -> &'static Handle {
    static FALLBACK: OnceLock<Runtime> = OnceLock::new();
    FALLBACK
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("futures-timer")
                .enable_time()
                .build()
                .expect("cannot start the timer thread for Delays made outside a tokio runtime")
        })
        .handle()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn completes_after_its_duration_and_again_when_polled_again() {
        let start = Instant::now();
        let mut delay = Delay::new(Duration::from_secs(5));
        assert!(poll_once(&mut delay).is_pending());
        (&mut delay).await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert!(
            poll_once(&mut delay).is_ready(),
            "a completed Delay went pending"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reset_moves_the_deadline_from_now() {
        let start = Instant::now();
        let mut delay = Delay::new(Duration::from_secs(5));
        tokio::time::sleep(Duration::from_secs(2)).await;
        delay.reset(Duration::from_secs(10));
        (&mut delay).await;
        assert_eq!(start.elapsed(), Duration::from_secs(12));
        // A completed Delay that is reset waits again.
        delay.reset(Duration::from_secs(1));
        assert!(poll_once(&mut delay).is_pending());
        (&mut delay).await;
        assert_eq!(start.elapsed(), Duration::from_secs(13));
    }

    #[tokio::test(start_paused = true)]
    async fn a_huge_duration_does_not_overflow() {
        let mut delay = Delay::new(Duration::MAX);
        assert!(poll_once(&mut delay).is_pending());
        delay.reset(Duration::MAX);
        assert!(poll_once(&mut delay).is_pending());
    }

    #[test]
    fn works_outside_any_runtime() {
        // Made and awaited on a plain thread with no tokio runtime: the fallback keeps it, and
        // it wakes its waker when it fires.
        let start = std::time::Instant::now();
        let wakes = block_on(Delay::new(Duration::from_millis(20)));
        assert!(start.elapsed() >= Duration::from_millis(20));
        assert!(
            wakes > 0,
            "the Delay completed without ever waking its task"
        );
    }

    #[test]
    fn made_outside_a_runtime_then_reset_and_awaited_in_one() {
        let mut delay = Delay::new(Duration::from_secs(3600));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let start = std::time::Instant::now();
        runtime.block_on(async move {
            delay.reset(Duration::from_millis(20));
            tokio::time::timeout(Duration::from_secs(10), delay)
                .await
                .expect("a Delay made outside the runtime and reset in it never fired");
        });
        assert!(start.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn made_in_a_runtime_and_awaited_on_another_thread() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        // Made inside the runtime's context (not outside it, where the fallback would take it).
        let delay = {
            let _in_runtime = runtime.enter();
            Delay::new(Duration::from_millis(20))
        };
        let start = std::time::Instant::now();
        let wakes = std::thread::spawn(move || block_on(delay)).join().unwrap();
        assert!(start.elapsed() >= Duration::from_millis(20));
        assert!(
            wakes > 0,
            "the Delay completed without ever waking its task"
        );
    }

    #[test]
    fn is_send_sync_unpin_and_debug_like_futures_timers() {
        fn check<T: Send + Sync + Unpin + fmt::Debug + 'static>() {}
        check::<Delay>();
    }

    fn poll_once(delay: &mut Delay) -> Poll<()> {
        Pin::new(delay).poll(&mut Context::from_waker(std::task::Waker::noop()))
    }

    /// A minimal executor: poll on this thread, park until woken (or a second, so that a
    /// missed wake fails the caller's check instead of hanging). Returns how often the future
    /// woke it.
    fn block_on(mut fut: impl Future<Output = ()> + Unpin) -> usize {
        struct Unparker(std::thread::Thread, AtomicUsize);
        impl std::task::Wake for Unparker {
            fn wake(self: Arc<Self>) {
                self.1.fetch_add(1, Ordering::SeqCst);
                self.0.unpark();
            }
        }
        let unparker = Arc::new(Unparker(std::thread::current(), AtomicUsize::new(0)));
        let waker = std::task::Waker::from(unparker.clone());
        let mut cx = Context::from_waker(&waker);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while Pin::new(&mut fut).poll(&mut cx).is_pending() {
            assert!(
                std::time::Instant::now() < deadline,
                "the Delay never completed"
            );
            std::thread::park_timeout(Duration::from_secs(1));
        }
        unparker.1.load(Ordering::SeqCst)
    }
}
