//! A small client of Prometheus's HTTP API and readers of what `deploy/` asks of it:
//! the Grafana dashboard's queries and the alert rules Prometheus loaded. The live
//! check (`deploy/live-check.sh`) uses them to prove that every panel and every rule
//! sees data from the real binaries, not only from `promtool`'s synthetic series.
//!
//! A newcomer's trap: a panel query with a fallback (`X or vector(0)`) always returns a
//! series, so its left side `X` is checked on its own as well.

use crate::http::HttpClient;
use anyhow::{bail, Context};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

/// One series of a query's answer: its labels and its values (one for an instant
/// query, one per step for a range query).
#[derive(Debug, Clone)]
pub struct Series {
    pub labels: serde_json::Map<String, Value>,
    pub values: Vec<f64>,
}

impl Series {
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).and_then(Value::as_str).unwrap_or("")
    }

    /// At least one value is a number (not NaN, which is what an empty histogram
    /// quantile gives: a panel line with no points).
    pub fn has_data(&self) -> bool {
        self.values.iter().any(|v| !v.is_nan())
    }
}

#[derive(Clone)]
pub struct Prometheus {
    http: HttpClient,
}

/// Seconds since the epoch, the API's time unit.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

impl Prometheus {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            http: HttpClient::new(addr),
        }
    }

    async fn api(&self, path_and_query: &str) -> anyhow::Result<Value> {
        let answer = self.http.get(path_and_query).await?;
        let v: Value = serde_json::from_str(&answer.body)
            .with_context(|| format!("Prometheus answered {}: {}", answer.status, answer.body))?;
        if v["status"] != "success" {
            bail!(
                "Prometheus refused {path_and_query}: {} {}",
                v["errorType"],
                v["error"]
            );
        }
        Ok(v["data"].clone())
    }

    /// An instant query, now.
    pub async fn query(&self, expr: &str) -> anyhow::Result<Vec<Series>> {
        let data = self
            .api(&format!("/api/v1/query?query={}", encode(expr)))
            .await?;
        Ok(series(&data))
    }

    /// A range query from `start` to now, one point every `step` seconds.
    pub async fn query_range(
        &self,
        expr: &str,
        start: f64,
        step: f64,
    ) -> anyhow::Result<Vec<Series>> {
        let data = self
            .api(&format!(
                "/api/v1/query_range?query={}&start={start:.3}&end={:.3}&step={step}",
                encode(expr),
                now()
            ))
            .await?;
        Ok(series(&data))
    }

    /// Every alerting rule Prometheus loaded: (group, name, expression as it parsed it).
    pub async fn alert_rules(&self) -> anyhow::Result<Vec<(String, String, String)>> {
        let data = self.api("/api/v1/rules?type=alert").await?;
        let mut out = Vec::new();
        for group in data["groups"].as_array().into_iter().flatten() {
            for rule in group["rules"].as_array().into_iter().flatten() {
                out.push((
                    group["name"].as_str().unwrap_or_default().to_string(),
                    rule["name"].as_str().unwrap_or_default().to_string(),
                    rule["query"].as_str().unwrap_or_default().to_string(),
                ));
            }
        }
        Ok(out)
    }

    /// Scrape targets by job: (job, instance, health).
    pub async fn targets(&self) -> anyhow::Result<Vec<(String, String, String)>> {
        let data = self.api("/api/v1/targets?state=active").await?;
        Ok(data["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                (
                    t["labels"]["job"].as_str().unwrap_or_default().to_string(),
                    t["labels"]["instance"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    t["health"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect())
    }
}

fn encode(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

fn number(v: &Value) -> f64 {
    v.as_str()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(f64::NAN)
}

fn series(data: &Value) -> Vec<Series> {
    data["result"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| Series {
            labels: s["metric"].as_object().cloned().unwrap_or_default(),
            values: match (s.get("value"), s.get("values")) {
                (Some(v), _) => vec![number(&v[1])],
                (None, Some(vs)) => vs
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| number(&p[1]))
                    .collect(),
                (None, None) => Vec::new(),
            },
        })
        .collect()
}

/// A panel's query: the panel's title, the query's legend, and the expression.
#[derive(Debug, Clone)]
pub struct PanelQuery {
    pub panel: String,
    pub legend: String,
    pub expr: String,
}

/// Every query of every panel of a Grafana dashboard (rows' nested panels included).
pub fn dashboard_queries(dashboard: &Value) -> Vec<PanelQuery> {
    fn walk(panels: &Value, out: &mut Vec<PanelQuery>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or_default();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push(PanelQuery {
                        panel: title.to_string(),
                        legend: t["legendFormat"].as_str().unwrap_or_default().to_string(),
                        expr: expr.to_string(),
                    });
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// Replaces Grafana's built-in interval variables with fixed windows, as Grafana
/// would for a dashboard opened over `range_secs` with Prometheus scraping every
/// `scrape_secs`. An unknown `$variable` is an error: Prometheus could not parse it.
pub fn grafana_to_promql(expr: &str, range_secs: u64, scrape_secs: u64) -> anyhow::Result<String> {
    // Grafana's $__rate_interval is at least four scrape intervals.
    let rate = (4 * scrape_secs).max(4);
    let out = expr
        .replace("$__rate_interval", &format!("{rate}s"))
        .replace("$__range", &format!("{range_secs}s"))
        .replace("$__interval", &format!("{scrape_secs}s"));
    if let Some(i) = out.find('$') {
        bail!("unknown variable in panel query: {}", &out[i..]);
    }
    Ok(out)
}

/// `X or vector(N)` without its fallback: `X`, which alone tells whether the metric
/// exists. `None` when there is no such fallback.
pub fn without_fallback(expr: &str) -> Option<String> {
    let trimmed = expr.trim_end();
    let open = trimmed.rfind(" or vector(")?;
    trimmed
        .ends_with(')')
        .then(|| trimmed[..open].trim().to_string())
}

/// An alert expression's input without its final threshold (`A > 0.1` gives `A`), to
/// show that the series an alert watches exist when no drill makes it fire.
pub fn without_threshold(expr: &str) -> String {
    let trimmed = expr.trim_end();
    let bytes = trimmed.as_bytes();
    // Walk back over the number, then the comparison operator.
    let mut i = trimmed.len();
    while i > 0 && (bytes[i - 1].is_ascii_digit() || b".eE+-".contains(&bytes[i - 1])) {
        i -= 1;
    }
    let number_start = i;
    while i > 0 && bytes[i - 1] == b' ' {
        i -= 1;
    }
    let before = &trimmed[..i];
    for op in [">=", "<=", "==", "!=", ">", "<"] {
        if number_start < trimmed.len() {
            if let Some(rest) = before.strip_suffix(op) {
                return rest.trim_end().to_string();
            }
        }
    }
    trimmed.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_and_fallbacks_come_off() {
        assert_eq!(
            without_threshold(r#"up{job="ingress"} == 0"#),
            r#"up{job="ingress"}"#
        );
        assert_eq!(
            without_threshold("histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m]))) > 0.1"),
            "histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m])))"
        );
        assert_eq!(without_threshold("absent(up == 1)"), "absent(up == 1)");
        assert_eq!(
            without_fallback("sum(increase(x[1h])) or vector(0)").as_deref(),
            Some("sum(increase(x[1h]))")
        );
        assert_eq!(without_fallback("sum(x)"), None);
        assert_eq!(
            grafana_to_promql("rate(x[$__rate_interval]) + increase(y[$__range])", 300, 1).unwrap(),
            "rate(x[4s]) + increase(y[300s])"
        );
        assert!(grafana_to_promql("x{queue=\"$queue\"}", 300, 1).is_err());
    }
}
