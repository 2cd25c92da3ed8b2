//! Optional phase timing of the CPU engine (`SCAE_PROFILE=1`).

/// Optional phase timing (`SCAE_PROFILE=1`): totals per phase printed to stderr after each
/// forward and backward; one environment lookup per pass when off.
pub struct Profile {
    on: bool,
    last: std::time::Instant,
    totals: Vec<(&'static str, f64)>,
}

impl Profile {
    pub fn new() -> Profile {
        Profile { on: std::env::var_os("SCAE_PROFILE").is_some(), last: std::time::Instant::now(), totals: Vec::new() }
    }

    /// Charge the time since the last mark to `phase`.
    pub fn mark(&mut self, phase: &'static str) {
        if !self.on {
            return;
        }
        let dt = self.last.elapsed().as_secs_f64() * 1e3;
        self.last = std::time::Instant::now();
        match self.totals.iter_mut().find(|(p, _)| *p == phase) {
            Some((_, t)) => *t += dt,
            None => self.totals.push((phase, dt)),
        }
    }

    pub fn report(&self, what: &str) {
        if self.on {
            let parts: Vec<String> = self.totals.iter().map(|(p, t)| format!("{p} {t:.1}")).collect();
            crate::note!("scae profile {what} (ms): {}", parts.join(", "));
        }
    }
}
