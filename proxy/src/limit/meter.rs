//! Message limits (`per: message`): each message a stream carries in one
//! direction is a unit of the limit, counted as it passes. A stream's own
//! budget lives in the stream (no store, no lock); a budget per key across
//! streams lives in the limiter's store: in process, or in Redis (a
//! decision per DATA frame, batched with the calls' decisions). Over the
//! rate a stream either ends (RESOURCE_EXHAUSTED) or, with `action:
//! delay`, its next message waits until the rate allows it: the stream is
//! paced, within its deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use prometheus::IntCounter;

use super::algorithm::{Decision, Params, State};
use super::check::{Answer, Check};
use super::memory::MemoryStore;
use super::redis::{RedisStore, StoreError};
use crate::config::{Action, FailureMode, OverCapacity};

/// Where a meter's budget is.
pub(crate) enum Place {
    /// This stream's alone.
    Stream(Option<State>),
    /// Shared by the streams with this key, in this process.
    Key(String),
    /// Shared by the streams with this key on every replica, in Redis.
    Redis(Box<InRedis>),
}

/// A budget per key in Redis, and what a meter does when Redis cannot
/// decide.
pub(crate) struct InRedis {
    pub(crate) key: String,
    pub(crate) redis: Arc<RedisStore>,
    /// The worker serving the call (its batcher).
    pub(crate) worker: usize,
    /// `limiter.replicas`: a `local` fallback counts this replica's share.
    pub(crate) replicas: u64,
    pub(crate) failure_mode: FailureMode,
    pub(crate) over_capacity: OverCapacity,
}

/// A decision Redis is making for a meter.
type Asking = Pin<Box<dyn Future<Output = Result<Vec<Decision>, StoreError>> + Send>>;

/// Counters of a message limit's outcomes, per message.
#[derive(Clone)]
pub(crate) struct MeterCounters {
    pub(crate) allowed: IntCounter,
    pub(crate) limited: IntCounter,
    pub(crate) delayed: IntCounter,
}

/// One message limit of one direction of one call.
pub(crate) struct Meter {
    name: Arc<str>,
    params: Params,
    action: Action,
    /// Counted, never refused nor delayed (`limiter.shadow`).
    shadow: bool,
    place: Place,
    store: Arc<MemoryStore>,
    counters: MeterCounters,
}

/// What the next messages get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// They go on.
    Pass,
    /// They wait this long, then ask again.
    Wait(Duration),
    /// The stream ends with RESOURCE_EXHAUSTED and this message.
    Refuse(String),
}

/// The message limits of one direction of a call.
pub(crate) struct Meters {
    list: Vec<Meter>,
    /// Meters that admitted the messages still waiting (a waiting chunk is
    /// not counted twice by the meters it passed).
    passed: usize,
    /// Of the meter after them, the messages it admitted so far: a chunk
    /// with more messages than a burst holds is admitted a burst at a time.
    admitted: u64,
    /// When messages that wait were due (µs, the store's clock). They are
    /// decided as of then, not as of the timer's wake-up: a timer fires a
    /// little late (up to a millisecond), and deciding at the late time
    /// would lose that much of the rate at every message (11 % at 100/s,
    /// half at 1,000/s, measured).
    due: Option<u64>,
    /// The call's deadline: a message that would wait past it is refused
    /// at once (it would never leave, and must not reach the upstream after
    /// the client was told the call ended).
    deadline: Option<tokio::time::Instant>,
    /// The decision Redis is making for the meter at `passed`.
    asking: Option<Asking>,
}

// === impl Meter ===

impl Meter {
    /// A meter of `params` whose budget is at `place`; `store`: the
    /// in-process store (its clock, and the budgets it keeps).
    pub(crate) fn new(
        name: Arc<str>,
        params: Params,
        action: Action,
        shadow: bool,
        place: Place,
        store: Arc<MemoryStore>,
        counters: MeterCounters,
    ) -> Meter {
        Meter {
            name,
            params,
            action,
            shadow,
            place,
            store,
            counters,
        }
    }

    /// Decides `n` messages at `now` (`asking`: the meter's decision in
    /// Redis, if one is being made).
    fn admit(
        &mut self,
        n: u64,
        now: u64,
        asking: &mut Option<Asking>,
        cx: &mut Context<'_>,
    ) -> Poll<Verdict> {
        if matches!(self.place, Place::Redis(_)) {
            return Poll::Ready(match ready!(self.ask_redis(n, asking, cx)) {
                Ok(d) => self.verdict(d, n),
                Err(v) => v,
            });
        }
        let d = match &mut self.place {
            Place::Stream(state) => {
                let (d, next) = self.params.decide(state.as_mut(), now, n);
                if d.allowed {
                    self.params.keep(state, next);
                }
                d
            }
            Place::Key(key) => {
                let check = Check::new(key.clone(), self.params, n, false);
                match self.store.decide_at(&[check], now).first() {
                    Some(Answer::Decided(d)) => *d,
                    // No room for the key: counted as nothing, let through.
                    _ => return Poll::Ready(Verdict::Pass),
                }
            }
            Place::Redis(_) => return Poll::Ready(Verdict::Pass),
        };
        Poll::Ready(self.verdict(d, n))
    }

    /// Redis's decision for `n` messages (asked once, then polled), or the
    /// verdict the meter comes to without one.
    fn ask_redis(
        &self,
        n: u64,
        asking: &mut Option<Asking>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Decision, Verdict>> {
        let Place::Redis(at) = &self.place else {
            return Poll::Ready(Err(Verdict::Pass));
        };
        let check = Check::new(at.key.clone(), self.params, n, false);
        if asking.is_none() {
            if !at.redis.admit(&check, at.redis.key_clock()) {
                // No room for another key of this replica's.
                let mode = match at.over_capacity {
                    OverCapacity::Open => FailureMode::Open,
                    OverCapacity::Closed => FailureMode::Closed,
                    OverCapacity::Local => FailureMode::Local,
                };
                return Poll::Ready(self.fall_back(mode, at, &check));
            }
            let (redis, worker) = (at.redis.clone(), at.worker);
            let checks = vec![check.clone()];
            *asking = Some(Box::pin(async move {
                redis.decide(worker, checks, None, true).await
            }));
        }
        let answer = match asking.as_mut() {
            Some(a) => ready!(a.as_mut().poll(cx)),
            None => return Poll::Ready(Err(Verdict::Pass)),
        };
        *asking = None;
        Poll::Ready(match answer.ok().and_then(|d| d.first().copied()) {
            Some(d) => Ok(d),
            None => self.fall_back(at.failure_mode, at, &check),
        })
    }

    /// Redis could not decide `check` (or has no room for its key): the
    /// decision `mode` gives, or the verdict it comes to at once.
    fn fall_back(
        &self,
        mode: FailureMode,
        at: &InRedis,
        check: &Check,
    ) -> Result<Decision, Verdict> {
        match mode {
            FailureMode::Open => {
                self.counters.allowed.inc_by(check.cost);
                Err(Verdict::Pass)
            }
            FailureMode::Closed if self.shadow => Err(Verdict::Pass),
            FailureMode::Closed => {
                self.counters.limited.inc_by(check.cost);
                Err(Verdict::Refuse(format!(
                    "message rate limit {:?} cannot be checked (its store is unavailable); the stream ends",
                    &*self.name
                )))
            }
            FailureMode::Local => {
                // This replica's share, the messages at most what it holds.
                let mut local = check.local_share(at.replicas);
                local.cost = local.cost.min(local.params.capacity());
                match self.store.decide(&[local]).first() {
                    Some(Answer::Decided(d)) => Ok(*d),
                    _ => Err(Verdict::Pass),
                }
            }
        }
    }

    /// What decision `d` for `n` messages comes to.
    fn verdict(&self, d: Decision, n: u64) -> Verdict {
        if d.allowed || self.shadow {
            self.counters.allowed.inc_by(n);
            return Verdict::Pass;
        }
        match self.action {
            Action::Reject => {
                self.counters.limited.inc_by(n);
                Verdict::Refuse(self.message())
            }
            Action::Delay => {
                self.counters.delayed.inc_by(n);
                Verdict::Wait(Duration::from_micros(d.retry_after_micros.max(1)))
            }
        }
    }

    fn message(&self) -> String {
        format!(
            "message rate limit {:?} exceeded ({} per {}); the stream ends",
            &*self.name,
            self.params.rate,
            match self.place {
                Place::Stream(_) => "stream",
                Place::Key(_) | Place::Redis(_) => "key",
            }
        )
    }
}

// === impl Meters ===

impl Meters {
    /// The meters of one direction; `None` when there are none.
    pub(crate) fn new(list: Vec<Meter>) -> Option<Box<Meters>> {
        (!list.is_empty()).then(|| {
            Box::new(Meters {
                list,
                passed: 0,
                admitted: 0,
                due: None,
                deadline: None,
                asking: None,
            })
        })
    }

    /// Sets the call's deadline.
    pub(crate) fn set_deadline(&mut self, deadline: Option<tokio::time::Instant>) {
        self.deadline = deadline;
    }

    /// Counts `n` messages against every meter in turn, in process only
    /// (tests).
    #[cfg(test)]
    pub(crate) fn admit(&mut self, n: u64) -> Verdict {
        match self.poll_admit(n, &mut Context::from_waker(std::task::Waker::noop())) {
            Poll::Ready(v) => v,
            Poll::Pending => panic!("a meter in process decided later"),
        }
    }

    /// Counts `n` messages (or asks again for the ones waiting) against
    /// every meter in turn; pending while Redis decides for one.
    pub(crate) fn poll_admit(&mut self, n: u64, cx: &mut Context<'_>) -> Poll<Verdict> {
        while self.passed < self.list.len() {
            let meter = &mut self.list[self.passed];
            let now = meter.store.now();
            // A stream's own budget is decided as of when the messages were
            // due; a shared key's as of now (others may have moved its
            // window on since).
            let at = match (&meter.place, self.due) {
                (Place::Stream(_), Some(due)) => due.min(now),
                _ => now,
            };
            let step = (n - self.admitted).min(meter.params.capacity());
            match ready!(meter.admit(step, at, &mut self.asking, cx)) {
                Verdict::Pass => {
                    self.admitted += step;
                    if self.admitted == n {
                        self.passed += 1;
                        self.admitted = 0;
                    }
                }
                Verdict::Wait(d) => {
                    let due = at.saturating_add(d.as_micros() as u64);
                    let wait = Duration::from_micros(due.saturating_sub(now).max(1));
                    if self
                        .deadline
                        .is_some_and(|end| tokio::time::Instant::now() + wait > end)
                    {
                        let why = format!(
                            "message rate limit {:?} ({}): the next message cannot go before the call's deadline",
                            &*meter.name, meter.params.rate
                        );
                        self.passed = 0;
                        self.admitted = 0;
                        self.due = None;
                        return Poll::Ready(Verdict::Refuse(why));
                    }
                    self.due = Some(due);
                    return Poll::Ready(Verdict::Wait(wait));
                }
                refused => {
                    self.passed = 0;
                    self.admitted = 0;
                    self.due = None;
                    return Poll::Ready(refused);
                }
            }
        }
        self.passed = 0;
        self.due = None;
        Poll::Ready(Verdict::Pass)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Rate;
    use crate::limit::algorithm::Algorithm;

    fn counters() -> MeterCounters {
        let c = || IntCounter::new("c", "c").unwrap();
        MeterCounters {
            allowed: c(),
            limited: c(),
            delayed: c(),
        }
    }

    fn meter(action: Action, key: Option<&str>, store: &Arc<MemoryStore>) -> Meter {
        meter_of(10, 2, action, key, store)
    }

    fn meter_of(
        per_second: u64,
        burst: u64,
        action: Action,
        key: Option<&str>,
        store: &Arc<MemoryStore>,
    ) -> Meter {
        let params = Params {
            rate: Rate {
                limit: per_second,
                period: Duration::from_secs(1),
            },
            burst: Some(burst),
            algorithm: Algorithm::Gcra,
        };
        Meter::new(
            "m".into(),
            params,
            action,
            false,
            key.map_or(Place::Stream(None), |k| Place::Key(k.to_owned())),
            store.clone(),
            counters(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_meter_refuses_or_paces_past_its_burst() {
        let store = Arc::new(MemoryStore::new(100));
        let mut reject = Meters::new(vec![meter(Action::Reject, None, &store)]).unwrap();
        assert_eq!(reject.admit(1), Verdict::Pass);
        assert_eq!(reject.admit(1), Verdict::Pass);
        assert!(matches!(reject.admit(1), Verdict::Refuse(m) if m.contains("per stream")));
        let mut delay = Meters::new(vec![meter(Action::Delay, None, &store)]).unwrap();
        delay.admit(2);
        let Verdict::Wait(d) = delay.admit(1) else {
            panic!()
        };
        assert_eq!(d, Duration::from_millis(100));
        tokio::time::advance(d).await;
        assert_eq!(delay.admit(1), Verdict::Pass);
        // A wait past the call's deadline is refused at once.
        let mut late = Meters::new(vec![meter(Action::Delay, None, &store)]).unwrap();
        late.set_deadline(Some(
            tokio::time::Instant::now() + Duration::from_millis(50),
        ));
        late.admit(2);
        assert!(
            matches!(late.admit(1), Verdict::Refuse(m) if m.contains("before the call's deadline"))
        );
        // More messages at once than the burst: a burst at a time.
        tokio::time::advance(Duration::from_millis(200)).await;
        let Verdict::Wait(d) = delay.admit(3) else {
            panic!()
        };
        tokio::time::advance(d).await;
        assert_eq!(delay.admit(3), Verdict::Pass);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_wake_up_keeps_the_pace() {
        // 10/s, burst 1: 100 ms apart. A timer that fires 30 ms late
        // decides as of when the message was due, so the next one is due
        // 100 ms after that, 70 ms after the late wake-up: the rate holds.
        let store = Arc::new(MemoryStore::new(100));
        let mut m = Meters::new(vec![meter_of(10, 1, Action::Delay, None, &store)]).unwrap();
        assert_eq!(m.admit(1), Verdict::Pass);
        let Verdict::Wait(d) = m.admit(1) else {
            panic!()
        };
        assert_eq!(d, Duration::from_millis(100));
        tokio::time::advance(d + Duration::from_millis(30)).await;
        assert_eq!(m.admit(1), Verdict::Pass);
        assert_eq!(m.admit(1), Verdict::Wait(Duration::from_millis(70)));
    }

    #[tokio::test(start_paused = true)]
    async fn streams_with_one_key_share_a_budget_and_waiting_counts_once() {
        let store = Arc::new(MemoryStore::new(100));
        let mut a = Meters::new(vec![meter(Action::Reject, Some("k"), &store)]).unwrap();
        let mut b = Meters::new(vec![meter(Action::Reject, Some("k"), &store)]).unwrap();
        assert_eq!(a.admit(1), Verdict::Pass);
        assert_eq!(b.admit(1), Verdict::Pass);
        assert!(matches!(a.admit(1), Verdict::Refuse(m) if m.contains("per key")));
        // Two meters: the first passes, the second makes the chunk wait;
        // asking again does not count it in the first a second time (it
        // has room for exactly 3 and refuses a 4th).
        let mut two = Meters::new(vec![
            meter_of(1, 3, Action::Reject, Some("x"), &store),
            meter(Action::Delay, None, &store),
        ])
        .unwrap();
        assert_eq!(two.admit(2), Verdict::Pass);
        assert!(matches!(two.admit(1), Verdict::Wait(_)));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(two.admit(1), Verdict::Pass);
    }
}
