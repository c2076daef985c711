//! Settings from the environment, a run of one seed (a thread per logical user, each with
//! its trace written to a file as it goes), and the report of a mismatch with its
//! minimised, replayable trace.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::action::{self, Action};
use super::env::{Cache, Env, User, Via};
use super::exec::{Executor, Mismatch};
use super::generate::{Features, Generator, AVOIDABLE};
use super::minimize::{minimize, replay, NotMinimized, Replay};
use super::server::Kind;
use super::wire::show;

/// How to run the test by hand (nextest would stop it after five minutes).
const CARGO_TEST: &str = "cargo test --release --test differential -- --exact differential --nocapture";

pub struct Settings {
    pub seeds: Vec<u64>,
    /// Steps per seed, over all users.
    pub steps: u64,
    pub via: Via,
    /// Total time for minimising failures.
    pub minimize: Duration,
    pub replay: Option<PathBuf>,
    pub users: usize,
    pub features: Features,
    /// The upstream (`MAILGATE_FUZZ_SERVER`).
    pub server: Kind,
    /// mailgate's cache (`MAILGATE_FUZZ_CACHE`); None: by seed, in turn.
    pub cache: Option<Cache>,
    /// When minimising must stop whatever its budget: under nextest, which stops a test
    /// after five minutes (then the report would be lost), 4 minutes after the start.
    pub hard_end: Option<Instant>,
}

impl Settings {
    pub fn from_env(default_seeds: &[u64], default_steps: u64) -> Settings {
        Settings::from_env_for(Kind::from_env(), default_seeds, default_steps)
    }

    /// [`Settings::from_env`] with the upstream given (`MAILGATE_FUZZ_SERVER` ignored).
    pub fn from_env_for(server: Kind, default_seeds: &[u64], default_steps: u64) -> Settings {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let seeds = var("MAILGATE_FUZZ_SEEDS").map(|s| parse_seeds(&s)).unwrap_or_else(|| default_seeds.to_vec());
        let steps = var("MAILGATE_FUZZ_STEPS").map(|s| s.trim().replace('_', "").parse().expect("MAILGATE_FUZZ_STEPS"));
        let via = match var("MAILGATE_FUZZ_VIA").as_deref().map(str::trim) {
            None | Some("mailgate") => Via::Mailgate,
            Some("direct") => Via::Direct,
            Some(other) => panic!("MAILGATE_FUZZ_VIA={other}: mailgate or direct"),
        };
        let protocols = var("MAILGATE_FUZZ_PROTOCOLS").unwrap_or_else(|| "imap,pop3".to_string()).to_ascii_lowercase();
        let minimize =
            var("MAILGATE_FUZZ_MINIMIZE_SECS").map(|s| s.trim().parse().expect("MAILGATE_FUZZ_MINIMIZE_SECS"));
        // `rebuild` is a server breaking RFC 9051 §2.3.1.1 (other messages under old UIDs):
        // mailgate catches what a proxy can see of it (docs/ARCHITECTURE.md, invariant 10;
        // tests/imap_cache_answers.rs), the rest is bounded by `cache.time_to_live`. It is
        // left out unless asked for (`MAILGATE_FUZZ_AVOID=none`).
        let avoid: Vec<String> = var("MAILGATE_FUZZ_AVOID")
            .unwrap_or_else(|| "rebuild".to_string())
            .replace("none", "")
            .split(',')
            .map(|a| a.trim().to_ascii_lowercase())
            .filter(|a| !a.is_empty())
            .collect();
        for a in &avoid {
            assert!(
                AVOIDABLE.iter().any(|(name, _)| name == a),
                "MAILGATE_FUZZ_AVOID: unknown {a:?}; known: {:?}",
                AVOIDABLE.iter().map(|(n, _)| *n).collect::<Vec<_>>()
            );
        }
        let mut avoid = avoid;
        // What the server itself does not support is never generated.
        for a in server.avoid() {
            if !avoid.iter().any(|x| x == a) {
                avoid.push(a.to_string());
            }
        }
        let features = Features {
            imap: protocols.contains("imap"),
            pop3: protocols.contains("pop3") && server.pop3(),
            avoid,
            folders: server.folders(),
        };
        assert!(
            features.imap || features.pop3,
            "MAILGATE_FUZZ_PROTOCOLS={protocols}: nothing {} can compare",
            server.name()
        );
        let cache = match var("MAILGATE_FUZZ_CACHE").as_deref().map(str::trim) {
            None | Some("mixed") => None,
            Some(name) => Some(
                Cache::from_name(name)
                    .unwrap_or_else(|| panic!("MAILGATE_FUZZ_CACHE={name}: mixed, {:?}", Cache::ALL.map(Cache::name))),
            ),
        };
        let nextest = std::env::var_os("NEXTEST_RUN_ID").is_some();
        let hard_end = (nextest && minimize.is_none()).then(|| Instant::now() + Duration::from_secs(240));
        Settings {
            hard_end,
            cache,
            server,
            features,
            seeds,
            steps: steps.unwrap_or(default_steps),
            via,
            minimize: Duration::from_secs(minimize.unwrap_or(90)),
            replay: var("MAILGATE_FUZZ_REPLAY").map(PathBuf::from),
            users: var("MAILGATE_FUZZ_USERS").map(|s| s.trim().parse().expect("MAILGATE_FUZZ_USERS")).unwrap_or(2),
        }
    }

    /// The cache of a seed's run: as set, else the profiles in turn.
    pub fn cache_for(&self, seed: u64) -> Cache {
        self.cache.unwrap_or(Cache::ALL[(seed % Cache::ALL.len() as u64) as usize])
    }

    fn env_line(&self, seeds: &str, steps: u64) -> String {
        let protocols = match (self.features.imap, self.features.pop3) {
            (true, true) => "imap,pop3",
            (true, false) => "imap",
            _ => "pop3",
        };
        format!(
            "MAILGATE_FUZZ_SERVER={} MAILGATE_FUZZ_SEEDS={seeds} MAILGATE_FUZZ_STEPS={steps} MAILGATE_FUZZ_VIA={} MAILGATE_FUZZ_PROTOCOLS={protocols} MAILGATE_FUZZ_AVOID={}{}",
            self.server.name(),
            self.via.name(),
            if self.features.avoid.is_empty() { "none".to_string() } else { self.features.avoid.join(",") },
            self.cache.map(|c| format!(" MAILGATE_FUZZ_CACHE={}", c.name())).unwrap_or_default()
        )
    }
}

/// `1,2,3`, `1..100` (100 excluded), `5..=9`, or a mix: `1,4..6`.
pub fn parse_seeds(text: &str) -> Vec<u64> {
    let mut seeds = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |s: &str| s.trim().parse::<u64>().unwrap_or_else(|_| panic!("MAILGATE_FUZZ_SEEDS: bad number {s:?}"));
        if let Some((a, b)) = part.split_once("..=") {
            seeds.extend(num(a)..=num(b));
        } else if let Some((a, b)) = part.split_once("..") {
            seeds.extend(num(a)..num(b));
        } else {
            seeds.push(num(part));
        }
    }
    seeds
}

pub fn users(seed: u64, n: usize) -> Vec<User> {
    (0..n)
        .map(|i| User {
            name: format!("fuzz{}", (b'a' + i as u8) as char),
            content_seed: seed.wrapping_mul(1_000_003).wrapping_add(i as u64 * 7_777 + 1),
        })
        .collect()
}

pub struct Failure {
    pub seed: u64,
    pub cache: Cache,
    pub user: User,
    pub step: u64,
    pub steps: u64,
    pub mismatch: Mismatch,
    pub trace: PathBuf,
    pub mailgate: String,
}

pub struct SeedRun {
    pub steps: u64,
    pub elapsed: Duration,
    pub failures: Vec<Failure>,
}

fn trace_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("differential");
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn header(settings: &Settings, seed: u64, user: &User) -> Vec<String> {
    vec![
        "mailgate differential trace".to_string(),
        format!("seed {seed}"),
        format!("user {}", user.name),
        format!("content {}", user.content_seed),
        format!("via {}", settings.via.name()),
        format!("cache {}", settings.cache_for(seed).name()),
    ]
}

/// Runs one seed: every logical user in its own thread, `settings.steps` steps in all,
/// stopping everyone at the first mismatch.
pub fn run_seed(settings: &Settings, seed: u64) -> SeedRun {
    let users = users(seed, settings.users);
    let env = Env::start(settings.via, settings.server, settings.cache_for(seed), &users);
    let stop = AtomicBool::new(false);
    let per_user = settings.steps.div_ceil(users.len() as u64);
    let started = Instant::now();
    let results: Vec<(u64, Option<Failure>)> = std::thread::scope(|scope| {
        let threads: Vec<_> = users
            .iter()
            .map(|user| {
                let (env, stop) = (&env, &stop);
                scope.spawn(move || run_user(settings, seed, env, user, per_user, stop))
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("fuzz thread panicked")).collect()
    });
    let elapsed = started.elapsed();
    let steps = results.iter().map(|(n, _)| n).sum();
    let failures = results.into_iter().filter_map(|(_, f)| f).collect();
    env.dispose();
    SeedRun { steps, elapsed, failures }
}

fn run_user(
    settings: &Settings,
    seed: u64,
    env: &Env,
    user: &User,
    steps: u64,
    stop: &AtomicBool,
) -> (u64, Option<Failure>) {
    // Tests of one binary run in parallel processes (differential, differential_courier) with
    // the same seeds: the server and the process keep their traces apart.
    let name = format!("{}-seed{seed}-{}-p{}.trace", settings.server.name(), user.name, std::process::id());
    let trace = trace_dir().join(name);
    let mut file = std::io::BufWriter::new(fs::File::create(&trace).unwrap());
    file.write_all(action::to_text(&header(settings, seed, user), &[]).as_bytes()).unwrap();
    let mut ex = Executor::new(env, &user.name);
    let mut generator = Generator::new(seed, user, &settings.features);
    let mut log = Vec::new();
    for step in 0..steps {
        if stop.load(Ordering::Relaxed) {
            return (step, None);
        }
        let result = generator.step(&mut ex, &mut log);
        writeln!(file, "# step {step}").unwrap();
        for action in log.drain(..) {
            file.write_all(action.to_text().as_bytes()).unwrap();
        }
        if let Err(mismatch) = result {
            stop.store(true, Ordering::Relaxed);
            file.flush().unwrap();
            let mailgate = env.mailgate_report();
            let cache = settings.cache_for(seed);
            return (
                step + 1,
                Some(Failure { seed, cache, user: user.clone(), step, steps, mismatch, trace, mailgate }),
            );
        }
    }
    drop(file);
    let _ = fs::remove_file(&trace);
    (steps, None)
}

/// Prints a failure at once (a test stopped while minimising still shows it), then its
/// minimised trace; returns the whole report.
pub fn report(settings: &Settings, failure: &Failure, deadline: Instant) -> String {
    let mut out = format!(
        "\n════ differential mismatch: seed {}, user {} (via {}), step {} of {} ════\n{}\n{}",
        failure.seed,
        failure.user.name,
        settings.via.name(),
        failure.step,
        failure.steps,
        failure.mismatch.what,
        failure.mismatch.detail
    );
    out.push_str(&format!(
        "rerun the seed:  {} {CARGO_TEST}\n",
        settings.env_line(&failure.seed.to_string(), failure.steps * settings.users as u64)
    ));
    let actions = fs::read_to_string(&failure.trace)
        .map_err(|e| e.to_string())
        .and_then(|text| action::parse(&text).map(|(_, actions)| actions));
    let actions = match actions {
        Ok(actions) => actions,
        Err(e) => {
            out.push_str(&format!("full trace:      {}: {e}\n", failure.trace.display()));
            out.push_str(&failure.mailgate);
            eprintln!("{out}");
            return out;
        }
    };
    out.push_str(&format!("full trace:      {} ({} actions)\n", failure.trace.display(), actions.len()));
    if let Some(raw) = &failure.mismatch.raw {
        let path = failure.trace.with_extension("answers");
        match fs::write(&path, raw) {
            Ok(()) => out.push_str(&format!("both answers:    {}\n", path.display())),
            Err(e) => out.push_str(&format!("both answers:    {}: {e}\n", path.display())),
        }
    }
    eprintln!("{out}");
    let head = out.len();
    match minimize(settings.via, settings.server, failure.cache, &failure.user, &actions, deadline) {
        Ok(min) => {
            let path = failure.trace.with_extension("min.trace");
            let mut head = header(settings, failure.seed, &failure.user);
            head.push(format!("minimised from step {} of the full trace", failure.step));
            let trace = action::to_text(&head, &min.actions);
            fs::write(&path, &trace).unwrap();
            out.push_str(&format!(
                "minimal trace:   {} ({} actions, {} replays from a fresh server{})\n",
                path.display(),
                min.actions.len(),
                min.replays,
                if min.complete { "" } else { "; time ran out, not fully minimal" }
            ));
            out.push_str(&format!("replay it:       MAILGATE_FUZZ_REPLAY={} {CARGO_TEST}\n", path.display()));
            out.push_str(&format!(
                "--- minimal trace (initial folders: server::initial_folders({}, {:?})) ---\n",
                failure.user.content_seed,
                settings.server.folders()
            ));
            out.push_str(&action::to_text(&[], &min.actions));
            if let Some(Action::Imap(cmds) | Action::Mutate(cmds)) = min.actions.last() {
                out.push_str(&format!("--- the failing write ---\n{:?}\n", show(&action::batch_bytes(cmds))));
            }
            out.push_str(&format!("--- on replay ---\n{}\n{}", min.mismatch.what, min.mismatch.detail));
        }
        Err(why) => {
            out.push_str(match why {
                NotMinimized::NotReproduced => {
                    "not reproduced alone from a fresh server (another user's traffic or timing?); last actions:\n"
                }
                NotMinimized::OutOfTime => "not minimised (MAILGATE_FUZZ_MINIMIZE_SECS ran out); last actions:\n",
            });
            let start = actions.len().saturating_sub(40);
            out.push_str(&action::to_text(&[], &actions[start..]));
            out.push_str(&failure.mailgate);
        }
    }
    eprintln!("{}", &out[head..]);
    out
}

/// A trace file's user (name and content seed), cache profile, header lines and actions.
pub fn read_trace(path: &Path) -> Result<(User, Cache, Vec<String>, Vec<Action>), String> {
    let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (header, actions) = action::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let get = |key: &str| header.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let user = User {
        name: get("user").ok_or("trace without `# user`")?,
        content_seed: get("content").and_then(|c| c.parse().ok()).ok_or("trace without `# content`")?,
    };
    // Traces from before cache profiles ran with the defaults.
    let cache = match get("cache") {
        Some(name) => Cache::from_name(&name).ok_or(format!("unknown `# cache {name}`"))?,
        None => Cache::Default,
    };
    let header = header.iter().filter(|(k, _)| k != "step").map(|(k, v)| format!("{k} {v}")).collect();
    Ok((user, cache, header, actions))
}

/// Runs a trace file in a fresh server (and mailgate): Ok if it replays clean.
pub fn replay_file(settings: &Settings, path: &Path) -> Result<String, String> {
    let (user, cache, _, actions) = read_trace(path)?;
    match replay(settings.via, settings.server, cache, &user, &actions, None) {
        Replay::Clean => {
            Ok(format!("{}: {} actions, no mismatch (via {})", path.display(), actions.len(), settings.via.name()))
        }
        Replay::Failed(i, m, mailgate) => Err(format!(
            "{}: mismatch at action {} of {}:\n{}\n{}{}",
            path.display(),
            i + 1,
            actions.len(),
            m.what,
            m.detail,
            mailgate
        )),
    }
}

/// MAILGATE_FUZZ_REPLAY: [`replay_file`], and a failing trace minimised (within
/// MAILGATE_FUZZ_MINIMIZE_SECS) into `target/tmp/differential/NAME.min.trace`.
pub fn replay_and_minimize(settings: &Settings, path: &Path) -> Result<String, String> {
    let mut out = match replay_file(settings, path) {
        Ok(clean) => return Ok(clean),
        Err(report) => report,
    };
    let (user, cache, mut header, actions) = read_trace(path)?;
    let deadline = Instant::now() + settings.minimize;
    // The failing action is the last one worth replaying.
    let failing = match replay(settings.via, settings.server, cache, &user, &actions, None) {
        Replay::Failed(i, ..) => i,
        Replay::Clean => return Err(format!("{out}(did not fail a second time: timing?)\n")),
    };
    match minimize(settings.via, settings.server, cache, &user, &actions[..=failing], deadline) {
        Ok(min) if min.actions.len() <= failing => {
            let name = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
            let min_path = trace_dir().join(format!("{name}.min.trace"));
            header.push(format!("minimised from {}", path.display()));
            fs::write(&min_path, action::to_text(&header, &min.actions)).unwrap();
            out.push_str(&format!(
                "minimised to {} actions ({} replays{}): {}\n{}",
                min.actions.len(),
                min.replays,
                if min.complete { "" } else { ", time ran out" },
                min_path.display(),
                action::to_text(&[], &min.actions)
            ));
        }
        _ => out.push_str("(not minimised further)\n"),
    }
    Err(out)
}
