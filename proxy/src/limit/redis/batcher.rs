//! One worker's batcher: the calls that arrive while a batch is in Redis
//! go together in the next, as one script run per Cluster slot; every call
//! is answered by its deadline, whatever Redis does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{AsyncConnectionConfig, RedisError};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use super::wire::{command, refund_command, split};
use super::{Inner, StoreError, Target, REFUND, SCRIPT};
use crate::limit::algorithm::Decision;
use crate::limit::breaker::Probe;
use crate::limit::check::Check;

#[derive(Clone)]
pub(super) enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// What a request asks of the script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Decide the checks (decide.lua).
    Decide,
    /// Give their costs back (refund.lua): another slot refused the call.
    Refund,
}

/// What the batcher answers a request: the decisions, and the time Redis
/// decided at (µs, the node's clock: a refund names it).
pub(super) type Reply = Result<(Vec<Decision>, u64), StoreError>;

/// One call's part of a batch.
pub(super) struct Request {
    pub(super) kind: Kind,
    pub(super) checks: Vec<Check>,
    /// Whether the figures of allowing limits are wanted (for headers).
    pub(super) details: bool,
    pub(super) now: Option<u64>,
    /// Cluster: the slot of the keys (all equal).
    pub(super) slot: Option<Slot>,
    /// The batcher answers by then, whatever Redis does.
    pub(super) deadline: Instant,
    /// `None` once answered.
    pub(super) reply: Option<oneshot::Sender<Reply>>,
    /// The breaker's probe, when this call is it: the batch that carries
    /// it reports its outcome, even if the call has gone away meanwhile.
    pub(super) probe: Option<Probe>,
}

impl Request {
    /// Answers the call (once; later answers are dropped).
    pub(super) fn answer(&mut self, result: Reply) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(result);
        }
    }

    /// Whether no one waits for an answer any more (answered, or the call
    /// gave up).
    fn settled(&self) -> bool {
        self.reply.as_ref().is_none_or(|r| r.is_closed())
    }

    /// Whether Redis's answer still matters: someone waits for it, or it
    /// carries the breaker's probe.
    fn wanted(&self) -> bool {
        !self.settled() || self.probe.is_some()
    }
}

/// Most calls in one script run; more wait for the next batch.
pub(super) const MAX_BATCH: usize = 256;

/// Batches one worker may have in Redis at once: one accumulating while
/// another is decided keeps the pipeline busy when Redis is slow to be
/// scheduled.
const MAX_IN_FLIGHT: usize = 4;

/// Takes the probes of `batch` (to report them).
fn probes(batch: &mut [Request]) -> impl Iterator<Item = Probe> + '_ {
    batch.iter_mut().filter_map(|r| r.probe.take())
}

/// What one request asks, but for its deadline and reply.
pub(super) struct Part {
    pub(super) kind: Kind,
    pub(super) checks: Vec<Check>,
    pub(super) now: Option<u64>,
    pub(super) slot: Option<Slot>,
    pub(super) details: bool,
}

impl Part {
    /// The request, answered by `timeout` from now, and where its answer
    /// comes.
    pub(super) fn request(
        self,
        timeout: Duration,
        probe: Option<Probe>,
    ) -> (Request, oneshot::Receiver<Reply>) {
        let (tx, rx) = oneshot::channel();
        let request = Request {
            kind: self.kind,
            checks: self.checks,
            details: self.details,
            now: self.now,
            slot: self.slot,
            deadline: Instant::now() + timeout,
            reply: Some(tx),
            probe,
        };
        (request, rx)
    }
}

/// The batcher's answer to a request.
pub(super) async fn answer(reply: oneshot::Receiver<Reply>) -> Reply {
    reply
        .await
        .unwrap_or_else(|_| Err(StoreError::Connection("the batcher stopped".into())))
}

/// Queues one request and waits for its answer.
pub(super) async fn submit(
    queue: &mpsc::UnboundedSender<Request>,
    timeout: Duration,
    part: Part,
    probe: Option<Probe>,
) -> Reply {
    let (request, reply) = part.request(timeout, probe);
    if queue.send(request).is_err() {
        return Err(StoreError::Connection("the batcher stopped".into()));
    }
    answer(reply).await
}

/// One worker's batcher: takes every call waiting, sends them as one script
/// run (one per Cluster slot, in parallel), hands each call its decisions,
/// and repeats. Owns the worker's connection; ends when the store is gone.
/// It answers every call by the call's deadline: while it waits (for a
/// place in flight, for a connection) calls whose time is up get a timeout,
/// and so do the calls of a batch in Redis, each at its own deadline. Calls
/// themselves need no timer.
pub(super) async fn batcher_loop(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Request>) {
    let mut conn: Option<(u64, Conn)> = None;
    let broken = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut pending: Vec<Request> = Vec::new();
    loop {
        if pending.is_empty() && rx.recv_many(&mut pending, MAX_BATCH).await == 0 {
            return;
        }
        // While the batches in flight are full, calls queue up for the next.
        let permit = match in_flight.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => match until(&mut pending, &mut rx, in_flight.clone().acquire_owned()).await {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        while pending.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => pending.push(r),
                Err(_) => break,
            }
        }
        let generation = inner.generation.load(Ordering::Acquire);
        if broken.swap(false, Ordering::AcqRel)
            || conn.as_ref().is_none_or(|(g, _)| *g != generation)
        {
            conn = None;
            let connecting = tokio::time::timeout(
                inner.connect_timeout,
                connect(&inner.target, inner.connect_timeout),
            );
            match until(&mut pending, &mut rx, connecting).await {
                Ok(Ok(c)) => conn = Some((generation, c)),
                Ok(Err(e)) => {
                    fail(&inner, &mut pending, &StoreError::Connection(e.to_string()));
                    continue;
                }
                Err(_) => {
                    let why = format!(
                        "no connection within {}",
                        humantime::format_duration(inner.connect_timeout)
                    );
                    fail(&inner, &mut pending, &StoreError::Connection(why));
                    continue;
                }
            }
        }
        let Some((_, c)) = &conn else { continue };
        let take = pending.len().min(MAX_BATCH);
        let now = Instant::now();
        // Calls go together when they share a clock and (Cluster) a slot;
        // calls that gave up or whose time is up need no Redis.
        let mut groups: Vec<Vec<Request>> = Vec::new();
        for mut r in pending.drain(..take) {
            if !r.wanted() {
                continue;
            }
            if r.deadline <= now {
                r.answer(Err(StoreError::Timeout));
                continue;
            }
            match groups
                .iter_mut()
                .find(|g| g[0].kind == r.kind && g[0].now == r.now && g[0].slot == r.slot)
            {
                Some(g) => g.push(r),
                None => groups.push(vec![r]),
            }
        }
        // Each group (one per Cluster slot) runs on its own; the batch's
        // place in flight is free once all are done.
        let permit = Arc::new(permit);
        for group in groups {
            let (inner, c, broken, permit) =
                (inner.clone(), c.clone(), broken.clone(), permit.clone());
            tokio::spawn(async move {
                if run(&inner, c, group).await {
                    // The next batch connects afresh.
                    broken.store(true, Ordering::Release);
                }
                drop(permit);
            });
        }
    }
}

/// Drives `work` to its end while the calls waiting for it run out of time:
/// each is answered with a timeout at its deadline. Calls that arrive
/// meanwhile join `pending` and are watched too.
async fn until<F: std::future::Future>(
    pending: &mut Vec<Request>,
    rx: &mut mpsc::UnboundedReceiver<Request>,
    work: F,
) -> F::Output {
    tokio::pin!(work);
    let mut open = true;
    loop {
        let oldest = pending.iter().map(|r| r.deadline).min();
        tokio::select! {
            // Expiry before arrivals: a steady stream of new calls must not
            // keep the waiting ones from their answer.
            biased;
            out = &mut work => return out,
            _ = tokio::time::sleep_until(oldest.unwrap_or_else(Instant::now)), if oldest.is_some() => {
                let now = Instant::now();
                pending.retain(Request::wanted);
                for mut r in pending.extract_if(.., |r| r.deadline <= now) {
                    r.answer(Err(StoreError::Timeout));
                }
            }
            n = rx.recv_many(pending, MAX_BATCH), if open => open = n > 0,
        }
    }
}

/// Answers every call of `batch` with `e`, and tells the breaker (once).
fn fail(inner: &Inner, batch: &mut Vec<Request>, e: &StoreError) {
    tracing::debug!(redis = %inner.shown, error = %e, calls = batch.len(), "Redis gave no decision");
    inner.report(Err(e), probes(batch));
    for mut r in batch.drain(..) {
        r.answer(Err(e.clone()));
    }
}

/// Runs one group as one script call and answers its calls; returns whether
/// the connection broke. Each call that runs out of time while Redis is at
/// it is answered with a timeout then; the others wait for Redis until the
/// last of them runs out.
async fn run(inner: &Inner, conn: Conn, mut group: Vec<Request>) -> bool {
    let (cmd, script) = match group[0].kind {
        Kind::Decide => (command(inner, &group), SCRIPT),
        Kind::Refund => (refund_command(inner, &group), REFUND),
    };
    let ask = async {
        let mut conn = conn;
        let first = query(&mut conn, &cmd).await;
        match first {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                // Redis restarted or flushed its scripts: load it again.
                let load = redis::cmd("SCRIPT").arg("LOAD").arg(script).clone();
                query::<String>(&mut conn, &load).await?;
                query(&mut conn, &cmd).await
            }
            other => other,
        }
    };
    tokio::pin!(ask);
    // Whether Redis let a call (or the probe) run out of time.
    let mut timed_out = false;
    let reply: Result<Vec<i64>, RedisError> = loop {
        let now = Instant::now();
        let Some(next) = group
            .iter()
            .filter(|r| r.wanted() && r.deadline > now)
            .map(|r| r.deadline)
            .min()
        else {
            // Every call is answered or gone: nothing waits for Redis. If
            // some ran out of time, Redis was too slow.
            if timed_out {
                inner.report(Err(&StoreError::Timeout), probes(&mut group));
            }
            return false;
        };
        tokio::select! {
            biased;
            reply = &mut ask => break reply,
            _ = tokio::time::sleep_until(next) => {
                let now = Instant::now();
                for r in group.iter_mut().filter(|r| r.deadline <= now) {
                    timed_out |= r.wanted();
                    r.answer(Err(StoreError::Timeout));
                }
            }
        }
    };
    let (error, broken) = match reply {
        Err(e) => {
            if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
                (StoreError::Connection(e.to_string()), true)
            } else {
                (StoreError::Response(e.to_string()), false)
            }
        }
        Ok(numbers) => match split(&numbers, &group) {
            Ok((decided_at, decisions)) => {
                inner.report(Ok(()), probes(&mut group));
                for (r, d) in group.iter_mut().zip(decisions) {
                    r.answer(Ok((d, decided_at)));
                }
                return false;
            }
            Err(e) => (StoreError::Response(e), false),
        },
    };
    fail(inner, &mut group, &error);
    broken
}

async fn query<T: redis::FromRedisValue>(
    conn: &mut Conn,
    cmd: &redis::Cmd,
) -> Result<T, RedisError> {
    match conn {
        Conn::Single(c) => cmd.query_async(c).await,
        Conn::Cluster(c) => cmd.query_async(c).await,
    }
}

async fn connect(target: &Target, connect_timeout: Duration) -> Result<Conn, RedisError> {
    match target {
        Target::Single(client) => {
            // Deadlines are the batcher's: the client's own response
            // timeout (500 ms) would report a slow answer as a broken
            // connection. A connection that never answers is rebuilt when
            // the breaker opens.
            let cfg = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(None);
            client
                .get_multiplexed_async_connection_with_config(&cfg)
                .await
                .map(Conn::Single)
        }
        Target::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
    }
}
