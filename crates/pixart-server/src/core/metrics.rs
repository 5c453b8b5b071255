//! Latency histograms (step and request durations): cumulative counts over fixed bounds, kept by
//! each process or in a shared store (`GET /metrics` renders them).

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

    /// Observations at or below each bound (cumulative), bound by bound.
    pub fn cumulative_counts(&self) -> &[u64] {
        &self.counts
    }

    /// The sum of the observations, in seconds.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// How many observations.
    pub fn count(&self) -> u64 {
        self.count
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
    fn histograms_are_cumulative() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(5));
        assert_eq!(h.cumulative_counts(), [1, 2]);
        assert_eq!(h.count(), 3);
        assert!((h.sum() - 5.55).abs() < 1e-9);
    }
}
