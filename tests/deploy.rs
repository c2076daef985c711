//! The deployment files under deploy/: the systemd unit (`systemd-analyze verify` and an
//! offline `systemd-analyze security` review, plus the settings it must keep), the
//! Kubernetes manifests (strict validation against the Kubernetes JSON schemas of
//! kubernetes-validate, and their agreement with each other and with the mailgate.toml
//! they carry), the compose file (the compose-spec schema) and the two shipped
//! configurations (`mailgate check-config`).
//!
//! tests/run.sh installs the tools: Debian's systemd, and a venv in target/deploy-venv from
//! tests/deploy/requirements.txt. A missing tool fails the test when CI=true; otherwise the
//! check prints "skipped: ..." and returns.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const UNIT: &str = "deploy/systemd/mailgate.service";
const K8S: &str = "deploy/kubernetes";
/// Kubernetes versions the manifests are validated against: the oldest and the newest
/// whose schemas kubernetes-validate 1.37.0 bundles.
const K8S_VERSIONS: [&str; 2] = ["1.25.0", "1.37.0"];
/// Files in deploy/kubernetes that are not resources of the kustomization.
const NOT_RESOURCES: [&str; 2] = ["kustomization.yaml", "prometheus-adapter-rule.yaml"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The tool, or `None` after saying the check is skipped; with CI=true a missing tool fails.
fn require(tool: &str, found: Option<PathBuf>) -> Option<PathBuf> {
    if found.is_none() {
        assert!(!ci(), "CI=true but {tool} is missing: tests/run.sh installs it");
        eprintln!("skipped: {tool} missing (tests/run.sh installs it)");
    }
    found
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

fn venv_tool(name: &str) -> Option<PathBuf> {
    let path = root().join("target/deploy-venv/bin").join(name);
    require(&format!("target/deploy-venv/bin/{name}"), path.is_file().then_some(path))
}

fn run(command: &mut Command) -> Output {
    command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"))
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// Seconds of a duration as mailgate ("30s", "250ms", "10m", "1h", bare seconds) or systemd
/// ("45s", "2min") write it, for the simple single-unit forms these files use.
fn seconds(value: &str) -> f64 {
    let value = value.trim();
    let split = value.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(value.len());
    let number: f64 = value[..split].parse().unwrap_or_else(|_| panic!("duration {value:?}"));
    number
        * match &value[split..] {
            "ms" => 0.001,
            "" | "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            unit => panic!("duration {value:?}: unit {unit:?}"),
        }
}

// --- systemd -------------------------------------------------------------------------

/// The `[Service]` settings of the unit, every value of each key in order.
fn service_settings(unit: &str) -> BTreeMap<String, Vec<String>> {
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut section = "";
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line;
            continue;
        }
        assert!(!line.ends_with('\\'), "{UNIT}: continuation lines are not expected: {line}");
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("{UNIT}: not a setting: {line}"));
        if section == "[Service]" {
            settings.entry(key.trim().to_string()).or_default().push(value.trim().to_string());
        }
    }
    settings
}

#[test]
fn systemd_unit_keeps_the_required_settings() {
    let settings = service_settings(&read(UNIT));
    let one = |key: &str| -> &str {
        match settings.get(key).map(Vec::as_slice) {
            Some([value]) => value,
            other => panic!("{UNIT}: {key}= must be set once, found {other:?}"),
        }
    };
    for (key, expected) in [
        ("User", "mailgate"),
        ("Group", "mailgate"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ReadOnlyPaths", "/etc/mailgate"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("RestrictNamespaces", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallFilter", "@system-service"),
        ("SystemCallArchitectures", "native"),
        ("UMask", "0077"),
        ("ExecStartPre", "/usr/local/bin/mailgate check-config --config /etc/mailgate/mailgate.toml"),
        ("ExecStart", "/usr/local/bin/mailgate run --config /etc/mailgate/mailgate.toml"),
        ("ExecReload", "kill -HUP $MAINPID"),
        ("KillSignal", "SIGTERM"),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(one(key), expected, "{UNIT}: {key}=");
    }
    assert!(settings.get("DynamicUser").is_none_or(|v| v == &["no"]), "{UNIT}: a fixed user, not DynamicUser=");

    // The example configuration is what a systemd installation starts from.
    let example: toml::Table = read("mailgate.example.toml").parse().unwrap();
    let grace = seconds(example["shutdown"]["grace"].as_str().unwrap());
    let stop = seconds(one("TimeoutStopSec"));
    assert!(stop > grace, "{UNIT}: TimeoutStopSec={stop}s must outlast [shutdown] grace = {grace}s");
    let max_connections = example["limits"]["max_connections"].as_integer().unwrap();
    let nofile: i64 = one("LimitNOFILE").parse().unwrap();
    assert!(nofile >= 2 * max_connections + 1024, "{UNIT}: LimitNOFILE={nofile}: two sockets per connection");
}

#[test]
fn systemd_unit_passes_systemd_analyze() {
    let Some(analyze) = require("systemd-analyze (Debian package systemd)", on_path("systemd-analyze")) else {
        return;
    };
    // verify checks that the executables exist: the unit's copy runs the binary under test.
    let binary = format!("={} ", env!("CARGO_BIN_EXE_mailgate"));
    let unit = read(UNIT).replace("=/usr/local/bin/mailgate ", &binary);
    assert_eq!(unit.matches(&binary).count(), 2, "ExecStartPre and ExecStart");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mailgate.service");
    std::fs::write(&path, unit).unwrap();

    let verify = run(Command::new(&analyze).args(["verify", "--man=no"]).arg(&path).env("SYSTEMD_COLORS", "0"));
    let output = text(&verify);
    assert!(verify.status.success() && output.trim().is_empty(), "systemd-analyze verify:\n{output}");

    // Exposure 0.0 (locked down) to 10.0 (unprotected); 2.0 is the top of systemd's "OK".
    let security = run(Command::new(&analyze)
        .args(["security", "--no-pager", "--offline=true", "--threshold=20"])
        .arg(&path)
        .env("SYSTEMD_COLORS", "0"));
    let output = text(&security);
    let overall = output.lines().find(|l| l.contains("Overall exposure level")).unwrap_or("");
    assert!(security.status.success(), "systemd-analyze security: exposure above 2.0:\n{output}");
    assert!(overall.contains("mailgate.service"), "{output}");
    eprintln!("{}", overall.trim());
}

// --- configurations ------------------------------------------------------------------

/// The literal block scalar `key: |` of a YAML file, read without a YAML library (the
/// crate has none): the following lines that are blank or indented deeper than the key,
/// less the block's indentation, with one final newline ("clip"). The cross-check test
/// compares it with PyYAML's reading.
fn literal_block(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines();
    let header = format!("{key}: |");
    let key_line = lines.by_ref().find(|l| l.trim() == header).unwrap_or_else(|| panic!("no `{header}` block"));
    let key_indent = key_line.len() - key_line.trim_start().len();
    let block: Vec<&str> =
        lines.take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > key_indent).collect();
    let indent = block.iter().find(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).unwrap();
    let mut text: Vec<&str> = block.iter().map(|l| if l.trim().is_empty() { "" } else { &l[indent..] }).collect();
    while text.last() == Some(&"") {
        text.pop();
    }
    text.join("\n") + "\n"
}

fn configmap_toml() -> String {
    literal_block(&read(&format!("{K8S}/configmap.yaml")), "mailgate.toml")
}

/// Runs `mailgate check-config` on `config` with its certificate, key and CA files (the
/// only files it names) replaced by generated ones, and requires success. Returns the
/// effective configuration it prints.
fn check_config_with_generated_certificates(what: &str, config: &str) -> String {
    let mut table: toml::Table = config.parse().unwrap_or_else(|e| panic!("{what}: {e}"));
    let dir = tempfile::tempdir().unwrap();

    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "deploy test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let files = [("ca.pem", ca.pem()), ("cert.pem", leaf.pem()), ("key.pem", leaf_key.serialize_pem())];
    for (name, pem) in &files {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    let generated = |name: &str| toml::Value::String(dir.path().join(name).to_str().unwrap().to_string());

    let mut replaced = 0;
    for pair in table["tls"]["certificates"].as_array_mut().unwrap() {
        for (key, file) in [("cert", "cert.pem"), ("key", "key.pem")] {
            let path = pair.get_mut(key).unwrap_or_else(|| panic!("{what}: tls.certificates without {key}"));
            assert!(path.as_str().is_some_and(|p| p.starts_with("/etc/mailgate/")), "{what}: {path}");
            *path = generated(file);
            replaced += 1;
        }
    }
    for (_, upstream) in table["upstream"].as_table_mut().unwrap() {
        if let Some(path) = upstream.get_mut("ca_file") {
            assert!(path.as_str().is_some_and(|p| p.starts_with("/etc/mailgate/")), "{what}: {path}");
            *path = generated("ca.pem");
            replaced += 1;
        }
    }
    assert!(replaced >= 2, "{what}: no certificate configured");
    if let Some(path) = table.get_mut("admin").and_then(|a| a.get_mut("token_file")) {
        assert!(path.as_str().is_some_and(|p| p.starts_with("/etc/mailgate/")), "{what}: {path}");
        std::fs::write(dir.path().join("admin-token"), "generated-admin-token\n").unwrap();
        *path = generated("admin-token");
    }

    let path = dir.path().join("mailgate.toml");
    std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
    let output = run(Command::new(env!("CARGO_BIN_EXE_mailgate")).args(["check-config", "--config"]).arg(&path));
    assert!(output.status.success(), "{what}: check-config failed:\n{}", text(&output));
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn kubernetes_configmap_configuration_passes_check_config() {
    let effective = check_config_with_generated_certificates("configmap.yaml mailgate.toml", &configmap_toml());
    assert!(effective.contains("store = \"redis\""), "{effective}");
    assert!(effective.contains("url = \"redis://redis:6379/0\""), "{effective}");

    // The PROXY protocol settings its comment documents (for use behind a balancer that
    // sends the header) are accepted on every listener.
    let documented: toml::Table = configmap_toml()
        .lines()
        .filter_map(|l| l.trim().strip_prefix('#').map(str::trim).filter(|l| l.starts_with("proxy_")))
        .collect::<Vec<_>>()
        .join("\n")
        .parse()
        .unwrap();
    assert_eq!(documented.keys().collect::<Vec<_>>(), ["proxy_protocol", "proxy_trusted"], "{documented}");
    let mut with_proxy: toml::Table = configmap_toml().parse().unwrap();
    for listener in with_proxy["listener"].as_array_mut().unwrap() {
        listener.as_table_mut().unwrap().extend(documented.clone());
    }
    let effective = check_config_with_generated_certificates(
        "configmap.yaml mailgate.toml with its PROXY protocol lines",
        &toml::to_string(&with_proxy).unwrap(),
    );
    assert_eq!(effective.matches("proxy_protocol = true").count(), 4, "{effective}");
}

#[test]
fn compose_configuration_passes_check_config() {
    let effective =
        check_config_with_generated_certificates("deploy/compose/mailgate.toml", &read("deploy/compose/mailgate.toml"));
    assert!(effective.contains("address = \"0.0.0.0:9090\""), "{effective}");
}

// --- schemas -------------------------------------------------------------------------

#[test]
fn compose_file_validates_against_the_compose_spec() {
    let Some(check) = venv_tool("check-jsonschema") else { return };
    let output = run(Command::new(check)
        .args(["--builtin-schema", "vendor.compose-spec"])
        .arg(root().join("deploy/compose.yaml")));
    assert!(output.status.success(), "deploy/compose.yaml:\n{}", text(&output));
}

/// Every YAML document of the files, read by PyYAML (tests/deploy/yaml2json.py).
fn yaml_documents(python: &Path, files: &[PathBuf]) -> BTreeMap<String, Vec<Value>> {
    let output = run(Command::new(python).arg(root().join("tests/deploy/yaml2json.py")).args(files));
    assert!(output.status.success(), "yaml2json.py:\n{}", text(&output));
    let all: BTreeMap<String, Vec<Value>> = serde_json::from_slice(&output.stdout).unwrap();
    all.into_iter()
        .map(|(path, docs)| (Path::new(&path).file_name().unwrap().to_str().unwrap().to_string(), docs))
        .collect()
}

/// The manifests of deploy/kubernetes by file name, after checking that kustomization.yaml
/// lists exactly the resource files present.
fn kustomized_manifests(python: &Path) -> (BTreeMap<String, Vec<Value>>, Vec<PathBuf>) {
    let dir = root().join(K8S);
    let kustomization = yaml_documents(python, &[dir.join("kustomization.yaml")]);
    let listed: BTreeSet<String> = kustomization["kustomization.yaml"][0]["resources"]
        .as_array()
        .expect("kustomization.yaml: resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".yaml") && !NOT_RESOURCES.contains(&name.as_str()))
        .collect();
    assert_eq!(listed, present, "kustomization.yaml resources vs the manifests in {K8S}");
    let files: Vec<PathBuf> = listed.iter().map(|name| dir.join(name)).collect();
    (yaml_documents(python, &files), files)
}

#[test]
fn kubernetes_manifests_validate_against_the_kubernetes_schemas() {
    let (Some(python), Some(validate)) = (venv_tool("python"), venv_tool("kubernetes-validate")) else { return };
    let (manifests, files) = kustomized_manifests(&python);
    let documents: usize = manifests.values().map(Vec::len).sum();
    for version in K8S_VERSIONS {
        // --strict: unknown fields are errors. A kind without a schema is only a warning
        // for the tool, so every document must be reported as passed, and nothing else.
        let output = run(Command::new(&validate).args(["--strict", "-k", version]).args(&files));
        let report = text(&output);
        assert!(output.status.success(), "Kubernetes {version}:\n{report}");
        let passed = report.lines().filter(|l| l.starts_with("INFO ") && l.contains(" passed for resource ")).count();
        let other: Vec<&str> = report.lines().filter(|l| !(l.starts_with("INFO ") && l.contains(" passed "))).collect();
        assert_eq!((passed, other.len()), (documents, 0), "Kubernetes {version}:\n{report}");
    }
}

// --- cross-checks --------------------------------------------------------------------

fn port_of(address: &str) -> u16 {
    address.rsplit_once(':').and_then(|(_, port)| port.parse().ok()).unwrap_or_else(|| panic!("{address}"))
}

/// `subset`'s labels all appear in `labels`.
fn selects(subset: &Value, labels: &Value, what: &str) {
    let subset = subset.as_object().unwrap_or_else(|| panic!("{what}: no labels"));
    assert!(!subset.is_empty(), "{what}: empty selector");
    for (key, value) in subset {
        assert_eq!(&labels[key], value, "{what}: label {key} does not select the mailgate pods");
    }
}

#[test]
fn kubernetes_manifests_agree_with_each_other_and_the_configuration() {
    let Some(python) = venv_tool("python") else { return };
    let (manifests, _) = kustomized_manifests(&python);
    let by_kind =
        |kind: &str| -> Vec<&Value> { manifests.values().flatten().filter(|d| d["kind"] == kind).collect::<Vec<_>>() };
    let single = |kind: &str| -> &Value {
        let all = by_kind(kind);
        assert_eq!(all.len(), 1, "one {kind} expected");
        all[0]
    };

    // The ConfigMap's mailgate.toml is the text the check-config test reads.
    let configmap = single("ConfigMap");
    let toml_text = configmap["data"]["mailgate.toml"].as_str().expect("ConfigMap data mailgate.toml");
    assert_eq!(toml_text, configmap_toml(), "literal_block() reads configmap.yaml as PyYAML does");
    let config: toml::Table = toml_text.parse().unwrap();
    let listeners = config["listener"].as_array().unwrap();
    let listener_ports: BTreeSet<u16> = listeners.iter().map(|l| port_of(l["address"].as_str().unwrap())).collect();
    assert_eq!(listener_ports, BTreeSet::from([110, 143, 993, 995]));
    let admin = config["admin"]["address"].as_str().unwrap();
    assert!(admin.starts_with("0.0.0.0:"), "[admin] address {admin}: the kubelet probes the pod IP");
    let admin_port = port_of(admin);
    assert_eq!(config["limits"]["store"].as_str(), Some("redis"));
    let grace = seconds(config["shutdown"]["grace"].as_str().unwrap_or("30s"));

    let deployment = single("Deployment");
    let spec = &deployment["spec"];
    let pod_labels = &spec["template"]["metadata"]["labels"];
    selects(&spec["selector"]["matchLabels"], pod_labels, "Deployment selector");
    assert!(spec.get("replicas").is_none(), "replicas belongs to the HPA (see deployment.yaml)");
    let pod = &spec["template"]["spec"];

    // Non-root, and the sysctl that lets it bind the ports below 1024.
    let security = &pod["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["runAsUser"], 10001, "the uid of deploy/Dockerfile");
    assert_eq!(security["runAsGroup"], 10001);
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    if listener_ports.iter().any(|&p| p < 1024) {
        let sysctls = security["sysctls"].as_array().expect("sysctls");
        assert!(
            sysctls.iter().any(|s| s["name"] == "net.ipv4.ip_unprivileged_port_start" && s["value"] == "0"),
            "ports below 1024 as uid 10001 need net.ipv4.ip_unprivileged_port_start=0"
        );
    }
    for constraint in pod["topologySpreadConstraints"].as_array().expect("topologySpreadConstraints") {
        selects(&constraint["labelSelector"]["matchLabels"], pod_labels, "topologySpreadConstraints");
    }
    let annotations = &spec["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], admin_port.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let container = &containers[0];
    let c_security = &container["securityContext"];
    assert_eq!(c_security["allowPrivilegeEscalation"], false);
    assert_eq!(c_security["readOnlyRootFilesystem"], true);
    assert_eq!(c_security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert!(c_security["capabilities"].get("add").is_none());

    // Ports: the listeners and the admin listener, by name for the probes and Services.
    let ports: BTreeMap<String, u16> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_string(), p["containerPort"].as_u64().unwrap() as u16))
        .collect();
    let mut expected = listener_ports.clone();
    expected.insert(admin_port);
    assert_eq!(ports.values().copied().collect::<BTreeSet<_>>(), expected, "containerPorts vs mailgate.toml");
    let resolve = |port: &Value| -> u16 {
        match port {
            Value::String(name) => *ports.get(name).unwrap_or_else(|| panic!("no container port named {name}")),
            port => port.as_u64().unwrap() as u16,
        }
    };
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(resolve(&container[probe]["httpGet"]["port"]), admin_port, "{probe} port");
    }

    // Shutdown: the preStop pause and the drain fit in the grace period.
    let pause = match container["lifecycle"]["preStop"]["exec"]["command"].as_array().map(Vec::as_slice) {
        Some([sleep, n]) if sleep == "sleep" => seconds(n.as_str().unwrap()),
        other => panic!("preStop: expected [\"sleep\", N], found {other:?}"),
    };
    let termination = pod["terminationGracePeriodSeconds"].as_f64().expect("terminationGracePeriodSeconds");
    assert!(
        termination > pause + grace,
        "terminationGracePeriodSeconds {termination} <= preStop {pause} + grace {grace}"
    );

    // Files: --config, the certificate and the upstream CA are where the volumes put them.
    let args: Vec<&str> = container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let config_path = match args.as_slice() {
        ["run", "--config", path] => Path::new(*path),
        other => panic!("args: {other:?}"),
    };
    let mounts: BTreeMap<&str, &str> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["readOnly"], true, "{m}");
            (m["mountPath"].as_str().unwrap(), m["name"].as_str().unwrap())
        })
        .collect();
    let volumes: BTreeMap<&str, &Value> =
        pod["volumes"].as_array().unwrap().iter().map(|v| (v["name"].as_str().unwrap(), v)).collect();
    let volume_of = |file: &Path| -> &Value {
        let dir = file.parent().unwrap().to_str().unwrap();
        let name = mounts.get(dir).unwrap_or_else(|| panic!("{} is on no volume mount", file.display()));
        volumes[name]
    };
    let configmap_name = configmap["metadata"]["name"].as_str().unwrap();
    let file_name = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_string();
    for file in [config_path.to_path_buf()].into_iter().chain(
        config["upstream"]
            .as_table()
            .unwrap()
            .values()
            .filter_map(|u| u.get("ca_file"))
            .map(|p| PathBuf::from(p.as_str().unwrap())),
    ) {
        assert_eq!(volume_of(&file)["configMap"]["name"], configmap_name, "{}", file.display());
        assert!(configmap["data"].get(file_name(&file)).is_some(), "ConfigMap has no {}", file_name(&file));
    }
    let secret = single("Secret");
    assert_eq!(secret["type"], "kubernetes.io/tls");
    let secret_files = secret.get("stringData").or(secret.get("data")).unwrap().as_object().unwrap();
    for pair in config["tls"]["certificates"].as_array().unwrap() {
        for key in ["cert", "key"] {
            let file = PathBuf::from(pair[key].as_str().unwrap());
            let volume = volume_of(&file);
            assert_eq!(volume["secret"]["secretName"], secret["metadata"]["name"], "{}", file.display());
            // Readable by the pod's group (fsGroup), not by others.
            let mode = volume["secret"]["defaultMode"].as_u64().unwrap_or(0o644);
            assert_eq!((mode & 0o040, mode & 0o007), (0o040, 0), "Secret defaultMode {mode:o}");
            assert_eq!(security["fsGroup"], security["runAsGroup"], "the key's group is the pod's");
            assert!(secret_files.contains_key(&file_name(&file)), "Secret has no {}", file_name(&file));
        }
    }
    // The admin token: a file of a Secret volume (created by hand: no value is shipped).
    let token_file = PathBuf::from(config["admin"]["token_file"].as_str().expect("[admin] token_file"));
    let token_volume = volume_of(&token_file);
    let token_secret = token_volume["secret"]["secretName"].as_str().expect("the admin token from a Secret");
    assert!(by_kind("Secret").iter().all(|s| s["metadata"]["name"] != token_secret), "no token value is shipped");
    let mode = token_volume["secret"]["defaultMode"].as_u64().unwrap_or(0o644);
    assert_eq!(mode & 0o007, 0, "admin token Secret defaultMode {mode:o}");

    // Placeholders only: no key material is shipped.
    for (key, value) in secret_files {
        let value = value.as_str().unwrap();
        assert!(value.contains("PLACEHOLDER") && !value.contains("-----BEGIN"), "Secret {key} must be a placeholder");
    }

    // The client Service: the listeners' ports, to pods on the same node.
    let services = by_kind("Service");
    let balancer = services.iter().find(|s| s["spec"]["type"] == "LoadBalancer").expect("a LoadBalancer Service");
    assert_eq!(balancer["spec"]["externalTrafficPolicy"], "Local");
    selects(&balancer["spec"]["selector"], pod_labels, "LoadBalancer Service");
    let mut exposed = BTreeSet::new();
    for port in balancer["spec"]["ports"].as_array().unwrap() {
        let number = port["port"].as_u64().unwrap() as u16;
        assert_eq!(resolve(&port["targetPort"]), number, "Service port {number}: clients see the listener's port");
        exposed.insert(number);
    }
    assert_eq!(exposed, listener_ports, "LoadBalancer ports vs listeners");
    // PROXY protocol on the balancer only together with the listeners that read it.
    let proxy_on_balancer =
        balancer["metadata"]["annotations"].as_object().is_some_and(|a| a.keys().any(|k| k.contains("proxy-protocol")));
    let proxy_on_listeners = listeners.iter().all(|l| {
        l.get("proxy_protocol").and_then(|v| v.as_bool()) == Some(true)
            && l.get("proxy_trusted").and_then(|v| v.as_array()).is_some_and(|t| !t.is_empty())
    });
    assert!(!proxy_on_balancer || proxy_on_listeners, "PROXY protocol on the balancer but not on every listener");

    let admin_service = services.iter().find(|s| s["spec"]["type"] == "ClusterIP").expect("a ClusterIP admin Service");
    selects(&admin_service["spec"]["selector"], pod_labels, "admin Service");
    let admin_ports = admin_service["spec"]["ports"].as_array().unwrap();
    assert_eq!(admin_ports.len(), 1);
    assert_eq!(resolve(&admin_ports[0]["targetPort"]), admin_port);

    // Ingress: the listeners from anywhere, the admin port only from selected peers.
    let policy = single("NetworkPolicy");
    selects(&policy["spec"]["podSelector"]["matchLabels"], pod_labels, "NetworkPolicy");
    assert_eq!(policy["spec"]["policyTypes"], serde_json::json!(["Ingress"]));
    let mut open_ports = BTreeSet::new();
    let mut admin_from = Vec::new();
    for rule in policy["spec"]["ingress"].as_array().unwrap() {
        for port in rule["ports"].as_array().expect("every ingress rule names its ports") {
            let number = resolve(&port["port"]);
            match rule.get("from") {
                None => assert!(open_ports.insert(number), "port {number} twice"),
                Some(from) => {
                    assert_eq!(number, admin_port, "only the admin port is restricted to peers");
                    admin_from.extend(from.as_array().unwrap().iter().cloned());
                }
            }
        }
    }
    assert_eq!(open_ports, listener_ports, "IMAP/POP3 from anywhere, nothing else");
    assert!(!admin_from.is_empty(), "the admin port admits someone (Prometheus)");
    for peer in &admin_from {
        assert!(peer.get("ipBlock").is_none(), "admin port peers by selector: {peer}");
        let namespaces = peer["namespaceSelector"]["matchLabels"].as_object().expect("a namespace selector");
        assert!(!namespaces.is_empty(), "an empty namespaceSelector admits every namespace: {peer}");
    }

    let pdb = single("PodDisruptionBudget");
    selects(&pdb["spec"]["selector"]["matchLabels"], pod_labels, "PodDisruptionBudget");
    assert!(pdb["spec"]["maxUnavailable"] == 1 || pdb["spec"]["minAvailable"] == 1, "{pdb}");

    // The HPA: at least two replicas, scaling the Deployment on the adapter's metric.
    let hpa = single("HorizontalPodAutoscaler");
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert!(hpa["spec"]["minReplicas"].as_u64().unwrap() >= 2, "{hpa}");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], deployment["metadata"]["name"]);
    let metrics = hpa["spec"]["metrics"].as_array().unwrap();
    let metric = metrics.iter().find(|m| m["type"] == "Pods").expect("a Pods metric");
    let metric_name = metric["pods"]["metric"]["name"].as_str().unwrap();
    assert_eq!(metric_name, "mailgate_connections_active");
    assert_eq!(metric["pods"]["target"]["type"], "AverageValue");
    let adapter = yaml_documents(&python, &[root().join(K8S).join("prometheus-adapter-rule.yaml")]);
    let rules = adapter["prometheus-adapter-rule.yaml"][0]["rules"]["custom"].as_array().expect("rules.custom");
    assert!(
        rules.iter().any(|r| r["name"]["as"] == metric_name
            && r["seriesQuery"].as_str().is_some_and(|q| q.starts_with(metric_name))
            && r["resources"]["overrides"]["pod"]["resource"] == "pod"),
        "prometheus-adapter-rule.yaml must serve {metric_name} per pod"
    );
    // The metric exists: mailgate exports it (docs/METRICS.md lists every family).
    assert!(read("docs/METRICS.md").contains(&format!("`{metric_name}`")));
}
