//! The Kubernetes manifests (`deploy/k8s`, rendered by `kubectl kustomize` as a user
//! would apply them) against what the binaries really do: the probes' paths and ports
//! answer on the real ingress and worker, the KEDA scaler watches the queue the worker
//! consumes, and pods get more time to stop than the binaries take to drain.

use b24_shared::amqp::Topology;
use b24_tests::http::HttpClient;
use b24_tests::pipeline::Pipeline;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

/// Every object of a kustomization, rendered by `kubectl kustomize`.
fn render(dir: &str) -> Vec<Value> {
    let path = format!("{}/../deploy/k8s/{dir}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("kubectl")
        .args(["kustomize", &path])
        .output()
        .expect("kubectl runs (it renders deploy/k8s)");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 YAML");
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let v: serde_norway::Value = serde::Deserialize::deserialize(doc).expect("YAML");
            serde_json::to_value(v).expect("YAML that is JSON")
        })
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

fn config(objects: &[Value]) -> BTreeMap<String, String> {
    serde_json::from_value(find(objects, "ConfigMap", "b24-pipeline")["data"].clone())
        .expect("string data")
}

/// The port of a `host:port` setting.
fn port_of(addr: &str) -> u64 {
    addr.parse::<SocketAddr>()
        .unwrap_or_else(|_| panic!("{addr} is an address"))
        .port()
        .into()
}

/// A container's port number by name (probes refer to ports by name).
fn container_port(container: &Value, name: &str) -> u64 {
    container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("container port {name}"))
}

async fn answers_200(addr: SocketAddr, path: &str, within: Duration) -> bool {
    let http = HttpClient::new(addr);
    let deadline = Instant::now() + within;
    loop {
        if let Ok(a) = http.get(path).await {
            if a.status == 200 {
                return true;
            }
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn probes_answer_on_the_real_binaries_and_ports_match_the_config() {
    let objects = render("base");
    let cfg = config(&objects);
    let p = Pipeline::start("k8s", 1, &[]).await;
    // (deployment, binary, setting of the port it listens on, where the app runs here)
    let apps = [
        ("b24-ingress", "ingress", "INGRESS_ADDR", p.ingress.addr),
        (
            "b24-worker",
            "worker",
            "WORKER_METRICS_ADDR",
            p.workers[0].metrics_addr,
        ),
    ];
    for (deployment, binary, setting, running) in apps {
        let pod = &find(&objects, "Deployment", deployment)["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        assert_eq!(c["command"], serde_json::json!([binary]), "{deployment}");
        for (probe, path) in [
            ("startupProbe", "/healthz"),
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
        ] {
            let get = &c[probe]["httpGet"];
            assert_eq!(get["path"], path, "{deployment} {probe}");
            let port = container_port(c, get["port"].as_str().expect("a named port"));
            assert_eq!(
                port,
                port_of(&cfg[setting]),
                "{deployment} {probe} port vs {setting}"
            );
            assert!(
                answers_200(running, path, Duration::from_secs(20)).await,
                "{binary} answers 200 on {path} ({deployment} {probe})"
            );
        }
        // The pod may take longer to stop than the binary takes to drain.
        let grace_ms = pod["terminationGracePeriodSeconds"].as_u64().expect("set") * 1000;
        let drain_ms: u64 = cfg[&format!("{}_SHUTDOWN_GRACE_MS", binary.to_uppercase())]
            .parse()
            .expect("milliseconds");
        assert!(
            grace_ms > drain_ms + 5000,
            "{deployment}: {grace_ms} ms vs drain {drain_ms} ms"
        );
    }
    // The Service and the ingress's NetworkPolicy lead to the port the ingress listens on.
    let service = find(&objects, "Service", "b24-ingress");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    let ingress_port = port_of(&cfg["INGRESS_ADDR"]);
    let policy = find(&objects, "NetworkPolicy", "b24-ingress");
    assert_eq!(
        policy["spec"]["ingress"][0]["ports"][0]["port"],
        ingress_port
    );
    let policy = find(&objects, "NetworkPolicy", "b24-worker");
    assert_eq!(
        policy["spec"]["ingress"][0]["ports"][0]["port"],
        port_of(&cfg["WORKER_METRICS_ADDR"])
    );
    p.finish().await;
}

#[test]
fn keda_scales_the_worker_deployment_on_the_queue_it_consumes() {
    let objects = render("overlays/keda");
    let cfg = config(&objects);
    let scaled = find(&objects, "ScaledObject", "b24-worker");
    assert_eq!(scaled["apiVersion"], "keda.sh/v1alpha1");
    let target = scaled["spec"]["scaleTargetRef"]["name"]
        .as_str()
        .expect("a target");
    let worker = find(&objects, "Deployment", target);
    assert_eq!(
        worker["spec"]["template"]["spec"]["containers"][0]["command"],
        serde_json::json!(["worker"])
    );
    assert!(
        worker["spec"].get("replicas").is_none(),
        "KEDA owns the worker count: no fixed replicas in the overlay"
    );
    let triggers = scaled["spec"]["triggers"].as_array().expect("triggers");
    let rabbit = triggers
        .iter()
        .find(|t| t["type"] == "rabbitmq")
        .expect("a rabbitmq trigger (queue length)");
    // What the worker consumes: its Topology under the configured AMQP_PREFIX.
    let queue = Topology::new(cfg["AMQP_PREFIX"].clone()).work_queue();
    assert_eq!(rabbit["metadata"]["queueName"], queue.as_str());
    assert_eq!(rabbit["metadata"]["mode"], "QueueLength");
    // Its credentials are the AMQP_URL the pods use.
    let auth = find(
        &objects,
        "TriggerAuthentication",
        rabbit["authenticationRef"]["name"].as_str().expect("auth"),
    );
    let url_ref = &worker["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "AMQP_URL")
        .expect("AMQP_URL")["valueFrom"]["secretKeyRef"];
    let host = &auth["spec"]["secretTargetRef"][0];
    assert_eq!(host["parameter"], "host");
    assert_eq!(host["name"], url_ref["name"]);
    assert_eq!(host["key"], url_ref["key"]);
    // The age trigger reads the worker's end-to-end histogram.
    let age = triggers
        .iter()
        .find(|t| t["type"] == "prometheus")
        .expect("a prometheus trigger (queue age)");
    let query = age["metadata"]["query"].as_str().expect("query");
    let registry = b24_worker::metrics::WorkerMetrics::default();
    registry.observe_end_to_end("ONCRMREQUISITEADD", chrono::Utc::now());
    let exposed = String::from_utf8(b24_shared::metrics::render(&registry.registry).1).unwrap();
    let metric = "b24_worker_end_to_end_seconds_bucket";
    assert!(
        query.contains(metric) && exposed.contains(metric),
        "{query}"
    );
}
