//! Helpers shared by fedlink's whole-process benchmarks (`fedlink-loadgen`,
//! `fedlink-quinn-bulk`): a process's memory and CPU time, read from Linux's
//! `/proc`.
#![forbid(unsafe_code)]

use std::time::Duration;

use fedlink_tools::impair::Impairment;

/// The emulated WAN a benchmark puts each site (connection) behind: one
/// impairment proxy per link (`fedlink_tools::impair`), the same flags in
/// every benchmark binary.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ImpairArgs {
    /// Put each site (connection) behind its own impairment proxy with
    /// this one-way delay, milliseconds, both ways (RTT = 2×).
    #[arg(long)]
    pub impair_delay_ms: Option<u64>,
    /// Impairment: loss probability per packet, both ways (e.g. 0.005).
    #[arg(long, default_value_t = 0.0)]
    pub impair_loss: f64,
    /// Impairment: rate limit per link, Mbit/s, both ways.
    #[arg(long)]
    pub impair_rate_mbit: Option<f64>,
}

impl ImpairArgs {
    /// The impairment the flags describe; `None` without
    /// `--impair-delay-ms` (no proxies).
    pub fn impairment(&self) -> Option<Impairment> {
        self.impair_delay_ms.map(|delay| Impairment {
            delay: Duration::from_millis(delay),
            loss: self.impair_loss,
            rate: self
                .impair_rate_mbit
                .map(|m| (m * 1e6 / 8.0).round() as u64),
            ..Impairment::default()
        })
    }

    /// The link's rate in MB/s (10^6 bytes), if limited.
    pub fn link_mb_per_s(&self) -> Option<f64> {
        self.impair_rate_mbit.map(|m| m / 8.0)
    }
}

/// Clock ticks per second of the times in `/proc/<pid>/stat` (`USER_HZ`).
/// It is part of Linux's user ABI, 100 on the architectures this benchmark
/// runs on (x86-64, arm64), whatever the kernel's own tick rate
/// (`CONFIG_HZ`).
pub const USER_HZ: f64 = 100.0;

/// CPU time a process has used, user + system, all its threads, in seconds
/// (resolution `1 / USER_HZ`). `pid` is a process id, or `"self"`. `None`
/// when the process is gone or the file cannot be parsed.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&text).map(|t| t as f64 / USER_HZ)
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line. The
/// command name (field 2) is in parentheses and may contain spaces or
/// parentheses itself, so the fields are counted from the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state (3), ppid (4), … utime is field 14, stime 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` and `VmHWM` (peak RSS) of a process, kB.
pub fn mem_kb(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impairment_flags_describe_the_proxy() {
        assert!(ImpairArgs::default().impairment().is_none());
        let a = ImpairArgs {
            impair_delay_ms: Some(20),
            impair_loss: 0.005,
            impair_rate_mbit: Some(200.0),
        };
        let imp = a.impairment().expect("a delay was given");
        assert_eq!(imp.delay, Duration::from_millis(20));
        assert_eq!(imp.loss, 0.005);
        assert_eq!(imp.rate, Some(25_000_000));
        assert_eq!(a.link_mb_per_s(), Some(25.0));
    }

    #[test]
    fn cpu_ticks_are_read_after_the_command_name() {
        // A name with a space and a parenthesis, as `comm` allows.
        let line = "4242 (a b) c) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    250 75 0 0 20 0 3 0 12345 1000000 200 18446744073709551615";
        assert_eq!(parse_cpu_ticks(line), Some(325));
        assert_eq!(parse_cpu_ticks("4242 (x) S 1 2"), None);
        assert_eq!(parse_cpu_ticks("no name at all"), None);
    }

    #[test]
    fn this_process_has_used_cpu_time_and_memory() {
        // Burn a little CPU so the tick counter has moved.
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(30) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let cpu = cpu_seconds("self").expect("/proc/self/stat");
        assert!(cpu > 0.0, "{cpu}");
        let (rss, hwm) = mem_kb(std::process::id()).expect("/proc/self/status");
        assert!(rss > 0 && hwm >= rss, "{rss} {hwm}");
    }
}
