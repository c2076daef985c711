//! Replays the fuzz corpora (`fuzz/corpus/<target>/`) and the inputs of fixed crashes
//! (`fuzz/regressions/<target>/`) through the same harnesses the coverage-guided targets
//! run (`mailgate::fuzzing`), on stable, as part of the normal suite: every property the
//! fuzzers checked still holds, and a crash found once stays fixed. How the corpora were
//! made: docs/TESTING.md, "Fuzzing".

use std::path::{Path, PathBuf};

type Harness = fn(&[u8]);

/// Every fuzz target and the harness it runs. `fetch_codec` (the differential target
/// against imap-codec, which the main crate does not depend on) is replayed through
/// mailgate's side of the comparison: its lines as `fetch_request` reads them.
const TARGETS: &[(&str, Harness)] = &[
    ("imap_framer", mailgate::fuzzing::imap_framer),
    ("imap_command", mailgate::fuzzing::imap_command),
    ("fetch_request", mailgate::fuzzing::fetch_request),
    ("fetch_response", mailgate::fuzzing::fetch_response),
    ("sequence_set", mailgate::fuzzing::sequence_set),
    ("pop3_codec", mailgate::fuzzing::pop3_codec),
    ("sasl_plain", mailgate::fuzzing::sasl_plain),
    ("sasl_oauth", mailgate::fuzzing::sasl_oauth),
    ("proxy_header", mailgate::fuzzing::proxy_header),
    ("admin_request", mailgate::fuzzing::admin_request),
    ("lookup_response", mailgate::fuzzing::lookup_response),
    ("fetch_codec", mailgate::fuzzing::fetch_codec_line),
];

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.map(|e| e.expect("readable corpus entry").path()).collect();
    files.sort();
    files
}

fn replay(target: &str, harness: Harness, dir: &Path) -> usize {
    let inputs = files(dir);
    for path in &inputs {
        let data = std::fs::read(path).expect("readable corpus file");
        if std::panic::catch_unwind(|| harness(&data)).is_err() {
            panic!(
                "{target}: {} fails; reproduce with `cargo +nightly fuzz run {target} {}`",
                path.display(),
                path.display()
            );
        }
    }
    inputs.len()
}

#[test]
fn every_corpus_input_keeps_its_harness_properties() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (target, harness) in TARGETS {
        let replayed = replay(target, *harness, &root.join("corpus").join(target));
        assert!(replayed >= 3, "fuzz/corpus/{target} holds {replayed} inputs: the corpus is missing");
    }
}

#[test]
fn every_fixed_crash_stays_fixed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("regressions");
    let mut replayed = 0;
    for (target, harness) in TARGETS {
        replayed += replay(target, *harness, &root.join(target));
    }
    assert!(replayed > 0, "fuzz/regressions/ holds no input");
}

/// Every target of the fuzz crate is replayed here (a new target needs a line above).
#[test]
fn every_fuzz_target_is_replayed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("fuzz_targets");
    let mut targets: Vec<String> =
        files(&dir).iter().filter_map(|p| Some(p.file_stem()?.to_str()?.to_string())).collect();
    targets.sort();
    let mut replayed: Vec<String> = TARGETS.iter().map(|(t, _)| t.to_string()).collect();
    replayed.sort();
    assert_eq!(targets, replayed);
}
