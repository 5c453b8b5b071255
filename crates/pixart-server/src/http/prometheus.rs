//! `GET /metrics` in Prometheus' text format (version 0.0.4), written by `prometheus-client`
//! from a snapshot of the queue: its counters and histograms may be shared by every process on
//! a Redis queue, so they are read at scrape time rather than kept in this process' registry.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::core::metrics::{Histogram, Latencies};
use crate::core::{Counters, QueueStats};

pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// What one scrape reports.
#[derive(Debug)]
pub struct Snapshot {
    /// Queue length and jobs running.
    pub stats: QueueStats,
    /// Request counters.
    pub counters: Counters,
    /// Step and request durations.
    pub latencies: Latencies,
}

impl Snapshot {
    /// The metrics as Prometheus' text format.
    pub fn render(self) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
        Ok(out)
    }
}

fn histogram(encoder: &mut DescriptorEncoder, name: &str, help: &str, h: &Histogram) -> Result<(), std::fmt::Error> {
    // prometheus-client takes each bucket's own count (it accumulates them), +Inf included.
    let mut below = 0;
    let mut buckets: Vec<(f64, u64)> = h
        .bounds()
        .iter()
        .zip(h.cumulative_counts())
        .map(|(bound, cumulative)| {
            let own = cumulative.saturating_sub(below);
            below = *cumulative;
            (*bound, own)
        })
        .collect();
    buckets.push((f64::INFINITY, h.count().saturating_sub(below)));
    encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?.encode_histogram::<NoLabelSet>(
        h.sum(),
        h.count(),
        &buckets,
        None,
    )
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (stats, c) = (&self.stats, &self.counters);
        encoder
            .encode_descriptor("pixart_queue_length", "Requests waiting in the queue", None, MetricType::Gauge)?
            .encode_gauge(&stats.queued)?;
        encoder
            .encode_descriptor("pixart_requests_running", "Requests being generated", None, MetricType::Gauge)?
            .encode_gauge(&stats.running)?;
        let help = "Requests by how they ended (accepted: every submit)";
        let mut requests = encoder.encode_descriptor("pixart_requests", help, None, MetricType::Counter)?;
        for (outcome, value) in
            [("accepted", c.accepted), ("succeeded", c.succeeded), ("failed", c.failed), ("cancelled", c.cancelled)]
        {
            let labels = vec![("outcome", outcome)];
            requests.encode_family(&labels)?.encode_counter::<NoLabelSet, _, u64>(&value, None)?;
        }
        let help = "Generations this process started";
        encoder
            .encode_descriptor("pixart_generations_started", help, None, MetricType::Counter)?
            .encode_counter::<NoLabelSet, _, u64>(&c.started, None)?;
        let latencies = &self.latencies;
        histogram(&mut encoder, "pixart_step_duration", "Duration of one denoising step", &latencies.step)?;
        let help = "Duration of a generated request from submit to its end, queue wait included";
        histogram(&mut encoder, "pixart_request_duration", help, &latencies.request)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn histograms_are_cumulative_in_prometheus_text() {
        let mut latencies = Latencies::default();
        for ms in [5, 50, 500, 120_000] {
            latencies.step.observe(Duration::from_millis(ms));
        }
        let counters = Counters { accepted: 4, succeeded: 3, ..Counters::default() };
        let text = Snapshot { stats: QueueStats { queued: 2, running: 1 }, counters, latencies }.render().unwrap();
        for line in [
            "pixart_queue_length 2\n",
            "pixart_requests_total{outcome=\"accepted\"} 4\n",
            "pixart_requests_total{outcome=\"succeeded\"} 3\n",
            "pixart_step_duration_seconds_bucket{le=\"0.01\"} 1\n",
            "pixart_step_duration_seconds_bucket{le=\"0.05\"} 2\n",
            "pixart_step_duration_seconds_bucket{le=\"0.5\"} 3\n",
            "pixart_step_duration_seconds_bucket{le=\"60\"} 3\n",
            "pixart_step_duration_seconds_bucket{le=\"+Inf\"} 4\n",
            "pixart_step_duration_seconds_count 4\n",
            "pixart_request_duration_seconds_count 0\n",
        ] {
            assert!(text.contains(line), "{line:?} not in:\n{text}");
        }
    }
}
