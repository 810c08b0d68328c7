//! Learning-rate schedule: linear warmup to the peak, then cosine decay to a floor.

/// Linear warmup over `warmup_steps`, then half a cosine from `peak` down to `floor` at
/// `total_steps`, and `floor` after that.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarmupCosine {
    /// Learning rate reached at the end of warmup.
    pub peak: f64,
    /// Learning rate at and after `total_steps`.
    pub floor: f64,
    /// Steps of linear warmup.
    pub warmup_steps: usize,
    /// Step at which decay reaches `floor`.
    pub total_steps: usize,
}

impl WarmupCosine {
    /// The learning rate for optimizer step `step`, counting from 0.
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            // Step 0 already gets a small positive rate, so no update is wasted.
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if step >= self.total_steps {
            return self.floor;
        }
        let decay_steps = (self.total_steps - self.warmup_steps).max(1) as f64;
        let progress = (step - self.warmup_steps) as f64 / decay_steps;
        self.floor
            + 0.5 * (self.peak - self.floor) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_rises_linearly_and_cosine_halves_at_the_midpoint() {
        let schedule = WarmupCosine {
            peak: 1.0,
            floor: 0.1,
            warmup_steps: 10,
            total_steps: 110,
        };
        // Warmup: (step + 1) / 10 of the peak.
        assert!((schedule.at(0) - 0.1).abs() < 1e-12);
        assert!((schedule.at(4) - 0.5).abs() < 1e-12);
        assert!((schedule.at(10) - 1.0).abs() < 1e-12);
        // Halfway through decay cos(pi/2) = 0, so floor + (peak - floor) / 2 = 0.55.
        assert!((schedule.at(60) - 0.55).abs() < 1e-12);
        assert!((schedule.at(110) - 0.1).abs() < 1e-12);
        assert!((schedule.at(500) - 0.1).abs() < 1e-12);
    }
}
