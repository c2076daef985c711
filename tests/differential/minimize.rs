//! Replaying a trace in a fresh environment, and shrinking a failing one: first the
//! shortest suffix that still fails at its last action, then delta debugging (ddmin) over
//! whole actions, then over the commands inside batches and POP3 sessions. A candidate
//! counts only if it fails at its last action (the original failing one), so the search
//! cannot wander off to another difference. Bounded by a deadline; the best trace found
//! so far is kept.

use std::time::Instant;

use super::action::Action;
use super::env::{Cache, Env, User, Via};
use super::exec::{Executor, Mismatch};
use super::server::Kind;

/// Where a replay stopped.
pub enum Replay {
    Clean,
    /// The mismatch and the index of the action that drew it.
    Failed(usize, Mismatch, String),
}

/// Runs `actions` for `user` in a fresh server (and mailgate); past `deadline` (if any) it
/// gives up and says Clean.
pub fn replay(
    via: Via,
    kind: Kind,
    cache: Cache,
    user: &User,
    actions: &[Action],
    deadline: Option<Instant>,
) -> Replay {
    let env = Env::start(via, kind, cache, std::slice::from_ref(user));
    let result = {
        let mut ex = Executor::new(&env, &user.name);
        let mut result = Replay::Clean;
        for (i, action) in actions.iter().enumerate() {
            if deadline.is_some_and(|d| Instant::now() > d) {
                break;
            }
            if let Err(m) = ex.run(action) {
                result = Replay::Failed(i, m, env.mailgate_report());
                break;
            }
        }
        result
    };
    env.dispose();
    result
}

pub struct Minimized {
    pub actions: Vec<Action>,
    pub mismatch: Mismatch,
    pub replays: usize,
    pub complete: bool,
}

/// Why there is no minimal trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotMinimized {
    /// Even the whole trace does not fail alone (the other user's concurrent traffic
    /// mattered, or the failure depends on timing).
    NotReproduced,
    /// The deadline passed before any replay failed.
    OutOfTime,
}

/// Shrinks `actions` (which failed at their last action) until `deadline`.
pub fn minimize(
    via: Via,
    kind: Kind,
    cache: Cache,
    user: &User,
    actions: &[Action],
    deadline: Instant,
) -> Result<Minimized, NotMinimized> {
    let mut replays = 0;
    let mut test = |candidate: &[Action]| -> Option<Mismatch> {
        replays += 1;
        match replay(via, kind, cache, user, candidate, Some(deadline)) {
            Replay::Failed(i, m, _) if i + 1 == candidate.len() => Some(m),
            _ => None,
        }
    };
    // The shortest failing suffix, growing fourfold.
    let mut best: Result<(Vec<Action>, Mismatch), NotMinimized> = Err(NotMinimized::OutOfTime);
    let mut k = 4;
    while Instant::now() < deadline {
        let start = actions.len().saturating_sub(k);
        if let Some(m) = test(&actions[start..]) {
            best = Ok((actions[start..].to_vec(), m));
            break;
        }
        if start == 0 {
            if Instant::now() < deadline {
                best = Err(NotMinimized::NotReproduced);
            }
            break;
        }
        k *= 4;
    }
    let (mut current, mut mismatch) = best?;

    // ddmin over the actions before the last one.
    let mut n = 2;
    let mut complete = false;
    while Instant::now() < deadline {
        let head = current.len() - 1;
        if head == 0 {
            complete = true;
            break;
        }
        let chunk = head.div_ceil(n);
        let mut reduced = false;
        let chunks = n;
        for i in 0..chunks {
            let (lo, hi) = (i * chunk, ((i + 1) * chunk).min(head));
            if lo >= hi {
                continue;
            }
            let candidate: Vec<Action> = current[..lo].iter().chain(&current[hi..]).cloned().collect();
            if let Some(m) = test(&candidate) {
                current = candidate;
                mismatch = m;
                n = (n - 1).max(2);
                reduced = true;
                break;
            }
            if Instant::now() > deadline {
                break;
            }
        }
        if !reduced {
            if n >= head {
                complete = true;
                break;
            }
            n = (n * 2).min(head);
        }
    }

    // The parts of composite actions (the last one included), one at a time.
    if complete {
        let mut i = 0;
        while i < current.len() && Instant::now() < deadline {
            let mut part = 0;
            while part < current[i].parts() && Instant::now() < deadline {
                match current[i].without_part(part) {
                    Some(smaller) => {
                        let mut candidate = current.clone();
                        candidate[i] = smaller;
                        if let Some(m) = test(&candidate) {
                            current = candidate;
                            mismatch = m;
                            continue;
                        }
                        part += 1;
                    }
                    None => break,
                }
            }
            i += 1;
        }
        complete = i >= current.len();
    }
    Ok(Minimized { actions: current, mismatch, replays, complete })
}
