//! Latency histograms (step and request durations), rendered in Prometheus' text format
//! (version 0.0.4) for `GET /metrics`.

use std::fmt::Write as _;
use std::time::Duration;

/// A cumulative histogram with fixed upper bounds, in seconds.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// Buckets for one denoising step (10 ms to 1 min).
    pub const STEP_BOUNDS: &'static [f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
    /// Buckets for a whole request, submit to end (50 ms to 1 h).
    pub const REQUEST_BOUNDS: &'static [f64] =
        &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];

    /// An empty histogram with these upper bounds (ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    /// Records one observation.
    pub fn observe(&mut self, value: Duration) {
        let seconds = value.as_secs_f64();
        for (bound, count) in self.bounds.iter().zip(&mut self.counts) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }

    /// The upper bounds.
    pub fn bounds(&self) -> &'static [f64] {
        self.bounds
    }

    /// A histogram from its parts (as a shared store keeps them): cumulative counts per bound,
    /// the sum of the observations and their number.
    pub fn from_parts(bounds: &'static [f64], counts: Vec<u64>, sum: f64, count: u64) -> Self {
        let mut counts = counts;
        counts.resize(bounds.len(), 0);
        Self { bounds, counts, sum, count }
    }

    /// Appends it to `out` in Prometheus' text format as `name`.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            self.count, self.sum, self.count
        );
    }
}

/// Which histogram an observation goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Latency {
    /// One denoising step.
    Step,
    /// A request from submit to its end.
    Request,
}

impl Latency {
    /// Its name in a store.
    pub fn name(self) -> &'static str {
        match self {
            Latency::Step => "step",
            Latency::Request => "request",
        }
    }

    /// Its bucket bounds.
    pub fn bounds(self) -> &'static [f64] {
        match self {
            Latency::Step => Histogram::STEP_BOUNDS,
            Latency::Request => Histogram::REQUEST_BOUNDS,
        }
    }
}

/// The latency histograms this process keeps.
#[derive(Debug, Clone)]
pub struct Latencies {
    /// Each denoising step.
    pub step: Histogram,
    /// Each request, from submit to its end (queue wait included).
    pub request: Histogram,
}

impl Latencies {
    /// Records one observation.
    pub fn observe(&mut self, which: Latency, value: Duration) {
        match which {
            Latency::Step => self.step.observe(value),
            Latency::Request => self.request.observe(value),
        }
    }
}

impl Default for Latencies {
    fn default() -> Self {
        Self { step: Histogram::new(Histogram::STEP_BOUNDS), request: Histogram::new(Histogram::REQUEST_BOUNDS) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_render_in_prometheus_format() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(5));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "X.");
        assert!(out.contains("x_seconds_bucket{le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_count 3\n") && out.contains("x_seconds_sum 5.55"), "{out}");
    }
}
