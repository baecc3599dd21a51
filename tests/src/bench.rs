//! What the `loadgen` and `bare_publisher` benchmark binaries share: flag parsing, the
//! measurement window, the realistic request body, and the one summary line both print.
//! `tests/bench/ingress.sh` parses that line: change its shape only together with the
//! script. Only what *completes* inside the window counts; warm-up traffic is discarded.

use crate::{fixtures, phpform};
use b24_shared::event::{InboundError, InboundEvent};
use b24_shared::{Envelope, EnvelopeKind};
use hdrhistogram::Histogram;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A bad command line, or `--help`; the message includes the usage text.
#[derive(Debug)]
pub struct FlagError {
    message: String,
    help: bool,
}

impl FlagError {
    fn new(message: String) -> Self {
        Self {
            message,
            help: false,
        }
    }

    /// For a binary's `main`: prints the usage (to stdout for `--help`, exit 0) or the
    /// mistake (to stderr, exit 2), without an error chain or backtrace around it.
    pub fn exit(&self) -> ! {
        if self.help {
            println!("{}", self.message);
            std::process::exit(0)
        }
        eprintln!("{}", self.message);
        std::process::exit(2)
    }
}

impl fmt::Display for FlagError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for FlagError {}

/// `--name value` pairs, checked against the names a binary accepts.
#[derive(Debug, Default)]
pub struct Flags {
    values: HashMap<String, String>,
}

impl Flags {
    /// Parses `args` (without the program name). `known` lists the accepted names
    /// without their dashes; `usage` is what `--help` and any mistake print.
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        known: &[&str],
        usage: &str,
    ) -> Result<Self, FlagError> {
        let mut values = HashMap::new();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            if arg == "--help" || arg == "-h" {
                return Err(FlagError {
                    message: usage.to_string(),
                    help: true,
                });
            }
            let name = arg
                .strip_prefix("--")
                .filter(|n| known.contains(n))
                .ok_or_else(|| FlagError::new(format!("unknown argument `{arg}`\n{usage}")))?;
            let value = args
                .next()
                .ok_or_else(|| FlagError::new(format!("--{name} needs a value\n{usage}")))?;
            values.insert(name.to_string(), value);
        }
        Ok(Self { values })
    }

    /// The value of `--name`, or `default` when it was not given.
    pub fn get<T: FromStr>(&self, name: &str, default: T) -> Result<T, FlagError> {
        Ok(self.opt(name)?.unwrap_or(default))
    }

    pub fn opt<T: FromStr>(&self, name: &str) -> Result<Option<T>, FlagError> {
        self.values
            .get(name)
            .map(|raw| {
                raw.parse().map_err(|_| {
                    FlagError::new(format!(
                        "--{name}: cannot read `{raw}` as {}",
                        std::any::type_name::<T>()
                    ))
                })
            })
            .transpose()
    }

    /// A duration given in (possibly fractional) seconds.
    pub fn secs(&self, name: &str, default: f64) -> Result<Duration, FlagError> {
        let secs: f64 = self.get(name, default)?;
        Duration::try_from_secs_f64(secs)
            .map_err(|_| FlagError::new(format!("--{name}: expected seconds >= 0, got {secs}")))
    }
}

/// A tokio runtime with `threads` workers. One thread is the default of both binaries:
/// on a 2-core machine the load generator must leave the other core to the server and
/// the broker, and a current-thread runtime spends the least CPU per request.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// Warm-up, then the measured part. A request counts when it completes inside
/// `[measure_from, until)`; nothing new is started at or after `until`.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub measure_from: Instant,
    pub until: Instant,
}

impl Window {
    pub fn starting_now(warmup: Duration, duration: Duration) -> Self {
        let measure_from = Instant::now() + warmup;
        Self {
            measure_from,
            until: measure_from + duration,
        }
    }

    pub fn counts(&self, done: Instant) -> bool {
        done >= self.measure_from && done < self.until
    }

    pub fn is_over(&self, now: Instant) -> bool {
        now >= self.until
    }

    pub fn measured(&self) -> Duration {
        self.until - self.measure_from
    }
}

/// When one connection (or publisher) starts each request.
///
/// Closed loop: as soon as the previous one finished. Open loop: on a fixed schedule,
/// and the caller measures latency from the *scheduled* start, so when the server
/// stalls the requests that should have been sent meanwhile show their wait in the
/// percentiles instead of silently not being sent (coordinated omission).
#[derive(Debug, Clone, Copy)]
pub enum Schedule {
    Closed,
    Open { next: Instant, every: Duration },
}

impl Schedule {
    /// For worker `i` of `n` sharing a total `rate` per second from `start`: each sends
    /// every `n / rate` seconds, staggered by `1 / rate` so the sum is an even stream.
    pub fn new(rate: Option<f64>, i: usize, n: usize, start: Instant) -> Self {
        match rate {
            None => Self::Closed,
            Some(rate) => {
                let step = Duration::from_secs_f64(1.0 / rate);
                Self::Open {
                    next: start + step * i as u32,
                    every: step * n as u32,
                }
            }
        }
    }

    /// Waits until the next request is due and returns when it was due; `None` once
    /// the window is over.
    pub async fn next(&mut self, window: &Window) -> Option<Instant> {
        let due = match self {
            Self::Closed => Instant::now(),
            Self::Open { next, every } => {
                let due = *next;
                if window.is_over(due) {
                    return None;
                }
                *next += *every;
                tokio::time::sleep_until(due.into()).await;
                due
            }
        };
        (!window.is_over(due)).then_some(due)
    }
}

/// Largest latency the histogram holds (longer ones are clamped to it): a minute, far
/// beyond the ingress's confirm timeout.
const MAX_LATENCY_US: u64 = 60_000_000;

/// Outcomes of one worker (or, merged, of a whole run) inside the window.
#[derive(Debug, Clone)]
pub struct Tally {
    pub ok: u64,
    /// Keyed by a short, low-cardinality reason: an HTTP status, `io`, `nack`…
    pub failed: BTreeMap<String, u64>,
    /// Latency of the successful requests only, in microseconds.
    pub latency: Histogram<u64>,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            ok: 0,
            failed: BTreeMap::new(),
            // 3 significant digits from 1 µs to a minute: constant, valid bounds.
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .expect("constant histogram bounds are valid"),
        }
    }
}

impl Tally {
    pub fn ok(&mut self, latency: Duration) {
        self.ok += 1;
        let us = u64::try_from(latency.as_micros()).unwrap_or(MAX_LATENCY_US);
        self.latency.saturating_record(us.max(1));
    }

    pub fn failed(&mut self, reason: &str) {
        *self.failed.entry(reason.to_string()).or_default() += 1;
    }

    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    pub fn merge(&mut self, other: &Tally) {
        self.ok += other.ok;
        for (reason, n) in &other.failed {
            *self.failed.entry(reason.clone()).or_default() += n;
        }
        // Both histograms have the same bounds, so adding cannot fail; clamp anyway.
        let _ = self.latency.add(&other.latency);
    }

    /// `NAME: OK ok, F failed in S s = R UNIT/s; latency p50 … ms p99 … ms p99.9 … ms
    /// max … ms`, then `; failures: REASON=N …` when there were any.
    pub fn summary(&self, name: &str, unit: &str, measured: Duration) -> String {
        let secs = measured.as_secs_f64();
        let rate = if secs > 0.0 {
            self.ok as f64 / secs
        } else {
            0.0
        };
        let ms = |q: f64| self.latency.value_at_quantile(q) as f64 / 1000.0;
        let mut line = format!(
            "{name}: {} ok, {} failed in {secs:.1} s = {rate:.1} {unit}/s; \
             latency p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms max {:.2} ms",
            self.ok,
            self.failed_total(),
            ms(0.5),
            ms(0.99),
            ms(0.999),
            self.latency.max() as f64 / 1000.0,
        );
        if !self.failed.is_empty() {
            let reasons: Vec<String> = self
                .failed
                .iter()
                .map(|(r, n)| format!("{r}={n}"))
                .collect();
            line.push_str("; failures: ");
            line.push_str(&reasons.join(" "));
        }
        line
    }
}

const DEAL_ID_MARK: &str = "BENCHDEALID";
const TS_MARK: &str = "BENCHTS";

/// The seed ONCRMDEALRECURRINGEXPOSE event, form-encoded the way Bitrix24 (PHP) sends
/// it, with `data[FIELDS][DEAL_ID]` and `ts` varied per request. Encoded once with
/// markers and spliced per request, so the load generator spends its CPU on sending.
#[derive(Debug, Clone)]
pub struct DealExposeForm {
    template: String,
}

impl Default for DealExposeForm {
    fn default() -> Self {
        let mut seed = fixtures::deal_recurring_expose();
        seed["data"]["FIELDS"]["DEAL_ID"] = DEAL_ID_MARK.into();
        seed["ts"] = TS_MARK.into();
        // The markers are alphanumeric, so `urlencode` leaves them as they are.
        Self {
            template: phpform::http_build_query(&seed),
        }
    }
}

impl DealExposeForm {
    pub fn body(&self, deal_id: u64, ts: u64) -> String {
        self.template
            .replacen(DEAL_ID_MARK, &deal_id.to_string(), 1)
            .replacen(TS_MARK, &ts.to_string(), 1)
    }
}

/// Seconds since the epoch, as Bitrix24 puts in `ts`.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The envelope the ingress publishes for one such event, built the way the ingress
/// builds it (the form decodes to the seed with every value a string), so the bare
/// publisher sends messages of the same size.
pub fn deal_expose_envelope(deal_id: u64, ts: u64) -> Result<Envelope, InboundError> {
    let mut payload = phpform::stringify(&fixtures::deal_recurring_expose());
    payload["data"]["FIELDS"]["DEAL_ID"] = deal_id.to_string().into();
    payload["ts"] = ts.to_string().into();
    let event = InboundEvent::parse(&payload)?;
    Ok(Envelope::new(
        EnvelopeKind::Event,
        event.event.as_str().to_string(),
        event.auth.member_id,
        event.auth.domain,
        payload,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Result<Flags, FlagError> {
        Flags::parse(
            args.iter().map(|s| s.to_string()),
            &["rate", "duration"],
            "usage",
        )
    }

    #[test]
    fn flags_parse_known_names_and_refuse_others() {
        let f = flags(&["--rate", "250.5", "--duration", "0.5"]).unwrap();
        assert_eq!(f.opt::<f64>("rate").unwrap(), Some(250.5));
        assert_eq!(
            f.secs("duration", 10.0).unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(f.get("missing", 7u32).unwrap(), 7);
        assert!(flags(&["--bogus", "1"]).is_err());
        assert!(flags(&["--rate"]).is_err());
        assert!(flags(&["--rate", "fast"])
            .unwrap()
            .opt::<f64>("rate")
            .is_err());
    }

    #[test]
    fn summary_line_has_the_shape_the_script_reads() {
        let mut t = Tally::default();
        for ms in 1..=100 {
            t.ok(Duration::from_millis(ms));
        }
        t.failed("503");
        let line = t.summary("loadgen", "events", Duration::from_secs(10));
        assert!(
            line.starts_with(
                "loadgen: 100 ok, 1 failed in 10.0 s = 10.0 events/s; latency p50 50."
            ),
            "{line}"
        );
        assert!(line.contains(" p99 99."), "{line}");
        assert!(line.ends_with("; failures: 503=1"), "{line}");
    }

    #[test]
    fn form_body_varies_deal_id_and_ts_and_decodes_to_the_seed() {
        let form = DealExposeForm::default();
        let body = form.body(123456, 1741092489);
        assert!(
            body.contains("data%5BFIELDS%5D%5BDEAL_ID%5D=123456"),
            "{body}"
        );
        assert!(body.contains("ts=1741092489"), "{body}");
        assert!(!body.contains("BENCH"));
        let seed = fixtures::deal_recurring_expose();
        let mut expected = seed.clone();
        expected["data"]["FIELDS"]["DEAL_ID"] = "123456".into();
        assert_eq!(body, phpform::http_build_query(&expected));
    }

    #[test]
    fn envelope_is_the_one_the_ingress_would_publish() {
        let env = deal_expose_envelope(6799, 1741092489).unwrap();
        assert_eq!(env.routing_key(), "event.oncrmdealrecurringexpose");
        assert_eq!(
            env.payload,
            phpform::stringify(&fixtures::deal_recurring_expose())
        );
        assert!(env.member_id.is_some());
    }
}
