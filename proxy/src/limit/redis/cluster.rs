//! A call whose limits live on several Cluster slots: a part per slot,
//! decided at once; the parts that committed are refunded when another
//! refused or failed, before the call is answered.

use std::time::Duration;

use redis::cluster_routing::Slot;
use tokio::sync::mpsc;

use super::batcher::{submit, Kind, Part, Request};
use super::StoreError;
use crate::limit::algorithm::Decision;
use crate::limit::breaker::Probe;
use crate::limit::check::{Check, Use};

/// Decides a call's parts, one per slot, at once; refunds the committed
/// parts when another refused or failed. See [`RedisStore::ask_slots`].
pub(super) async fn decide_parts(
    queue: &mpsc::UnboundedSender<Request>,
    timeout: Duration,
    checks: &[Check],
    slots: &[Slot],
    now: Option<u64>,
    probe: Option<Probe>,
) -> Result<Vec<Decision>, StoreError> {
    let mut parts: Vec<(Slot, Vec<usize>)> = Vec::new();
    for (i, slot) in slots.iter().enumerate() {
        match parts.iter_mut().find(|(s, _)| s == slot) {
            Some((_, at)) => at.push(i),
            None => parts.push((*slot, vec![i])),
        }
    }
    let mut probe = probe;
    let asked = parts.iter().map(|(slot, at)| {
        let part = Part {
            kind: Kind::Decide,
            checks: at.iter().map(|&i| checks[i].clone()).collect(),
            now,
            slot: Some(*slot),
            // Every part needs the figures: whether it committed decides
            // the refunds.
            details: true,
        };
        submit(queue, timeout, part, probe.take())
    });
    let answers = futures::future::join_all(asked).await;
    let mut decisions: Vec<Option<Decision>> = vec![None; checks.len()];
    let mut committed = Vec::new();
    let mut refused = false;
    let mut failed = None;
    for ((slot, at), answer) in parts.iter().zip(answers) {
        let d = match answer {
            Ok((d, t)) if d.len() == at.len() => (d, t),
            Ok((d, _)) => {
                failed = Some(StoreError::Response(format!(
                    "the decision script returned {} decisions for {} limits",
                    d.len(),
                    at.len()
                )));
                continue;
            }
            Err(e) => {
                failed = Some(e);
                continue;
            }
        };
        let (d, t) = d;
        let refuses = at
            .iter()
            .zip(&d)
            .any(|(&i, d)| !d.allowed && !checks[i].shadow);
        if refuses {
            refused = true;
        } else {
            // This part committed what its allowed limits took (a peek
            // took nothing).
            let back: Vec<Check> = at
                .iter()
                .zip(&d)
                .filter(|(&i, d)| d.allowed && checks[i].mode != Use::Peek)
                .map(|(&i, _)| checks[i].clone())
                .collect();
            if !back.is_empty() {
                committed.push((*slot, back, t));
            }
        }
        for (&i, d) in at.iter().zip(d) {
            decisions[i] = Some(d);
        }
    }
    if refused || failed.is_some() {
        let refunds = committed.into_iter().map(|(slot, back, t)| {
            let part = Part {
                kind: Kind::Refund,
                checks: back,
                now: Some(t),
                slot: Some(slot),
                details: false,
            };
            submit(queue, timeout, part, None)
        });
        for r in futures::future::join_all(refunds).await {
            if let Err(e) = r {
                tracing::warn!(error = %e, "a refund for a call refused on another slot failed: its other limits keep the units");
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(decisions.into_iter().flatten().collect()),
    }
}
