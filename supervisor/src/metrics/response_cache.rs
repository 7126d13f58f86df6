//! The response cache's series, per (engine, model): lookups that hit and missed (counters),
//! and the entries and bytes it holds (gauges the server sets after each insert, from the
//! cache's footprints). Exported as `gptossd_response_cache_{hits,misses}_total` and
//! `gptossd_response_cache_{entries,bytes}`, and in `/stats` as the `response_cache` object.
//!
//! A lookup is counted only for a request the cache could answer (its profile has the cache
//! on and its output is fully determined): a request of a profile without the cache is
//! neither a hit nor a miss.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};

use super::{Metrics, ModelLabels};

/// `/stats` counts of one (engine, model).
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    hits: u64,
    misses: u64,
    entries: u64,
    bytes: u64,
}

/// The response cache's families and `/stats` counts.
#[derive(Debug, Default)]
pub(super) struct CacheSeries {
    hits: Family<ModelLabels, Counter>,
    misses: Family<ModelLabels, Counter>,
    entries: Family<ModelLabels, Gauge>,
    bytes: Family<ModelLabels, Gauge>,
    counts: Mutex<BTreeMap<ModelLabels, Counts>>,
}

impl CacheSeries {
    /// Adds the families to `r` (under the registry's prefix).
    pub(super) fn register(&self, r: &mut Registry) {
        r.register(
            "response_cache_hits",
            "Requests answered from the response cache",
            self.hits.clone(),
        );
        r.register(
            "response_cache_misses",
            "Cacheable requests the response cache did not hold, run by the model",
            self.misses.clone(),
        );
        r.register(
            "response_cache_entries",
            "Answers held in the response cache",
            self.entries.clone(),
        );
        r.register(
            "response_cache_bytes",
            "Bytes held in the response cache (an estimate of the heap its entries use)",
            self.bytes.clone(),
        );
    }

    /// A poisoned lock only means a panic elsewhere mid-update of plain counts.
    fn counts(&self) -> MutexGuard<'_, BTreeMap<ModelLabels, Counts>> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The `/stats` object: totals, then one entry per (engine, model).
    pub(super) fn stats_json(&self) -> Value {
        let counts = self.counts().clone();
        let total = counts.values().fold(Counts::default(), |t, c| Counts {
            hits: t.hits + c.hits,
            misses: t.misses + c.misses,
            entries: t.entries + c.entries,
            bytes: t.bytes + c.bytes,
        });
        let models: Vec<Value> = counts
            .iter()
            .map(|(m, c)| {
                json!({
                    "engine": m.engine,
                    "model": m.model,
                    "hits": c.hits,
                    "misses": c.misses,
                    "entries": c.entries,
                    "bytes": c.bytes,
                })
            })
            .collect();
        json!({
            "hits": total.hits,
            "misses": total.misses,
            "entries": total.entries,
            "bytes": total.bytes,
            "models": models,
        })
    }
}

fn labels(engine: &str, model: &str) -> ModelLabels {
    ModelLabels {
        engine: engine.to_owned(),
        model: model.to_owned(),
    }
}

impl Metrics {
    /// Counts one response-cache lookup of a request on `model`: a hit or a miss.
    pub fn response_cache_lookup(&self, engine: &str, model: &str, hit: bool) {
        let m = labels(engine, model);
        let c = &self.response_cache;
        let family = if hit { &c.hits } else { &c.misses };
        family.get_or_create(&m).inc();
        let mut counts = c.counts();
        let entry = counts.entry(m).or_default();
        if hit {
            entry.hits += 1;
        } else {
            entry.misses += 1;
        }
    }

    /// Sets what the response cache holds for `model`.
    pub fn set_response_cache_footprint(
        &self,
        engine: &str,
        model: &str,
        entries: usize,
        bytes: usize,
    ) {
        let m = labels(engine, model);
        let c = &self.response_cache;
        let clamp = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        c.entries.get_or_create(&m).set(clamp(entries));
        c.bytes.get_or_create(&m).set(clamp(bytes));
        let mut counts = c.counts();
        let entry = counts.entry(m).or_default();
        entry.entries = entries as u64;
        entry.bytes = bytes as u64;
    }
}

#[cfg(test)]
mod tests {
    use crate::metrics::Metrics;

    #[test]
    fn lookups_and_footprints_show_in_prometheus_and_stats_per_model() {
        let m = Metrics::new();
        m.response_cache_lookup("e", "a", false);
        m.response_cache_lookup("e", "a", true);
        m.response_cache_lookup("e", "a", true);
        m.response_cache_lookup("e", "b", false);
        m.set_response_cache_footprint("e", "a", 1, 2048);
        let text = m.render_prometheus();
        for line in [
            "gptossd_response_cache_hits_total{engine=\"e\",model=\"a\"} 2",
            "gptossd_response_cache_misses_total{engine=\"e\",model=\"a\"} 1",
            "gptossd_response_cache_misses_total{engine=\"e\",model=\"b\"} 1",
            "gptossd_response_cache_entries{engine=\"e\",model=\"a\"} 1",
            "gptossd_response_cache_bytes{engine=\"e\",model=\"a\"} 2048",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
        let stats = &m.stats_json()["response_cache"];
        assert_eq!(
            (
                &stats["hits"],
                &stats["misses"],
                &stats["entries"],
                &stats["bytes"]
            ),
            (&2.into(), &2.into(), &1.into(), &2048.into())
        );
        assert_eq!(stats["models"][0]["model"], "a");
        assert_eq!(stats["models"][1]["misses"], 1);
        // A footprint replaces the last one: the cache evicted.
        m.set_response_cache_footprint("e", "a", 0, 0);
        assert_eq!(m.stats_json()["response_cache"]["bytes"], 0);
    }
}
