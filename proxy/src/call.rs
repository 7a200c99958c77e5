//! What one call shares with the rest of its connection, and a connection
//! with its timers.
//!
//! [`CallState`] is what the two directions of a call share: the request
//! side's framing problem, and whether data moved. [`Activity`] is what a
//! connection's lifecycle task reads: how many calls are open, how many
//! ended, and the calls without a deadline it watches for the stream idle
//! timeout. The watching costs a call no timer of its own: the lifecycle
//! task looks at the watched calls every quarter of the timeout, and ends a
//! call that moved no data for four looks in a row (so after the timeout,
//! and before a quarter more).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;

use crate::grpc::frame::FrameError;

/// Looks in a row without data that end a watched call.
const QUIET_LOOKS: u8 = 4;

/// What the two directions of one call share.
#[derive(Debug, Default)]
pub(crate) struct CallState {
    request_error: OnceLock<FrameError>,
    /// Why a message limit ended the request side.
    limited: OnceLock<String>,
    /// Set whenever data passes either way; the watcher clears it when it
    /// looks.
    moved: AtomicBool,
    /// Looks in a row that found no data moved.
    quiet: AtomicU8,
    /// Set by the watcher: the call has been idle for the stream idle
    /// timeout.
    expired: AtomicBool,
    waker: AtomicWaker,
}

// === impl CallState ===

impl CallState {
    /// The request side's framing problem, if any.
    pub(crate) fn request_error(&self) -> Option<FrameError> {
        self.request_error.get().copied()
    }

    /// Keeps the request side's framing problem (the first one).
    pub(crate) fn set_request_error(&self, e: FrameError) {
        let _ = self.request_error.set(e);
    }

    /// Why a message limit ended the request side, if one did.
    pub(crate) fn limited(&self) -> Option<String> {
        self.limited.get().cloned()
    }

    /// Keeps why a message limit ended the request side (the first).
    pub(crate) fn set_limited(&self, why: String) {
        let _ = self.limited.set(why);
    }

    /// Data passed (either way).
    pub(crate) fn mark_moved(&self) {
        self.moved.store(true, Ordering::Relaxed);
    }

    /// Ready once the watcher has found the call idle for the stream idle
    /// timeout; until then the task is woken when it does.
    pub(crate) fn poll_expired(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.expired.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// One look of the watcher: whether the call has now been quiet for
    /// [`QUIET_LOOKS`] looks in a row (then it is woken to end).
    fn look(&self) -> bool {
        if self.expired.load(Ordering::Acquire) {
            // Ended already; its watch goes when the call's response does.
            return false;
        }
        if self.moved.swap(false, Ordering::Relaxed) {
            self.quiet.store(0, Ordering::Relaxed);
            return false;
        }
        let quiet = self.quiet.fetch_add(1, Ordering::Relaxed) + 1;
        if quiet >= QUIET_LOOKS {
            self.expired.store(true, Ordering::Release);
            self.waker.wake();
            return true;
        }
        false
    }
}

/// What a connection's calls are doing, as its lifecycle task reads it.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    open: AtomicUsize,
    /// Calls ended so far: unchanged between two looks with none open, the
    /// connection was idle all that time.
    ended: AtomicU64,
    watched: Mutex<Watched>,
}

/// The calls watched for the stream idle timeout (a slab: places are
/// reused).
#[derive(Debug, Default)]
struct Watched {
    calls: Vec<Option<Weak<CallState>>>,
    free: Vec<usize>,
}

/// A call counted as open on its connection until dropped.
#[derive(Debug)]
pub(crate) struct OpenCall(Arc<Activity>);

/// A call watched for the stream idle timeout until dropped.
#[derive(Debug)]
pub(crate) struct Watch {
    activity: Arc<Activity>,
    at: usize,
}

// === impl Activity ===

impl Activity {
    /// Counts a call as open until the returned guard is dropped.
    pub(crate) fn open(self: &Arc<Self>) -> OpenCall {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenCall(self.clone())
    }

    /// Watches `call` (one without a deadline) for the stream idle timeout
    /// until the returned guard is dropped.
    pub(crate) fn watch(self: &Arc<Self>, call: &Arc<CallState>) -> Option<Watch> {
        // A call starts as having moved: the first look does not count.
        call.mark_moved();
        let mut w = self.watched.lock().ok()?;
        let weak = Some(Arc::downgrade(call));
        let at = match w.free.pop() {
            Some(at) => {
                w.calls[at] = weak;
                at
            }
            None => {
                w.calls.push(weak);
                w.calls.len() - 1
            }
        };
        Some(Watch {
            activity: self.clone(),
            at,
        })
    }

    /// Whether no call is open, and the count of calls ended so far.
    pub(crate) fn idle(&self) -> (bool, u64) {
        (
            self.open.load(Ordering::Acquire) == 0,
            self.ended.load(Ordering::Acquire),
        )
    }

    /// One look at the watched calls: wakes those idle for the stream
    /// idle timeout. Returns how many it ended.
    pub(crate) fn look(&self) -> usize {
        let Ok(w) = self.watched.lock() else {
            return 0;
        };
        w.calls
            .iter()
            .flatten()
            .filter_map(Weak::upgrade)
            .filter(|c| c.look())
            .count()
    }
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        let a = &self.0;
        a.ended.fetch_add(1, Ordering::Relaxed);
        a.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Ok(mut w) = self.activity.watched.lock() {
            w.calls[self.at] = None;
            w.free.push(self.at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watched_call_ends_after_four_quiet_looks_and_data_puts_it_off() {
        let a = Arc::new(Activity::default());
        let call = Arc::new(CallState::default());
        let _watch = a.watch(&call);
        assert_eq!(a.look(), 0, "it starts as having moved");
        assert_eq!(a.look() + a.look() + a.look(), 0);
        call.mark_moved();
        assert_eq!(a.look(), 0, "data put it off");
        for _ in 0..3 {
            assert_eq!(a.look(), 0);
        }
        assert_eq!(a.look(), 1, "four quiet looks in a row");
        assert!(call.expired.load(Ordering::Acquire));
    }

    #[test]
    fn an_expired_call_still_watched_is_looked_at_without_end() {
        // Its watch goes with its response, which may be much later: looks
        // after the end change nothing (and never overflow a count).
        let a = Arc::new(Activity::default());
        let call = Arc::new(CallState::default());
        let _watch = a.watch(&call);
        let ended: usize = (0..1_000).map(|_| a.look()).sum();
        assert_eq!(ended, 1);
    }

    #[test]
    fn watch_places_are_reused() {
        let a = Arc::new(Activity::default());
        for _ in 0..100 {
            let call = Arc::new(CallState::default());
            let _w = a.watch(&call);
        }
        assert_eq!(a.watched.lock().unwrap().calls.len(), 1);
    }
}
