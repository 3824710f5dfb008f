//! The promise that matters most to a Vault operator, proven against real peers: once Vault
//! has handed out its unseal keys, none is lost, whatever stops at whatever moment.
//!
//! Each cell of the matrix initialises a fresh OpenBao (raft storage) through unseal-init with
//! a fresh SoftHSM2 token, hits one step of the init with one fault (SIGTERM or SIGKILL of
//! unseal-init, SIGKILL of OpenBao followed by a restart on the same storage, or the pod
//! deleted: SIGTERM to both with the shipped manifest's `preStop` hook and grace period),
//! starts unseal-init again and checks that Vault is initialised and unsealed, that every key
//! and the root token are on the token and decrypt (with `pkcs11-tool`) to exactly what
//! `sys/init` returned, and that no journal is left. Beside the matrix: a `sys/init` answered
//! only after 150 s under the shipped liveness probe, and a pod deletion without the `preStop`
//! hook (what the hook prevents, reported as lost keys). The one window no client can close —
//! SIGKILL while `sys/init` is in flight or in the moment before the journal reaches the disk
//! — is reported as observed, not asserted. The matrix is printed as a markdown table
//! (`cargo test --test fault_matrix -- --nocapture`; `FAULT_MATRIX_COLUMNS=pod` runs only the
//! columns whose label contains `pod`). Cells share no peer and run several at once
//! (`FAULT_MATRIX_JOBS`, default 8): most of a cell is OpenBao's raft `sys/init` waiting.

mod common;

use common::faults::{
    self, Deletion, Evidence, FaultTap, Hold, InitReply, LivenessProber, ReleaseOnDrop, Shipped,
    Signaller, Trigger, Watched, has_field, is_event, poll,
};
use common::proxy;
use common::{matrix, write_config};
use nitrokey_e2e::openbao::{OpenBao, free_port};
use nitrokey_e2e::softhsm::SoftHsm;
use nitrokey_e2e::token::Token;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A moment of the init.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// `PUT sys/init` sent; the proxy holds Vault's reply.
    InitSent,
    /// The reply arrived (logged just before the keys are encrypted and journaled).
    InitAnswered,
    /// The journal is on disk.
    JournalWritten,
    /// `vault-unseal-N` stored and verified.
    KeyStored(usize),
    /// `vault-root` stored and verified.
    RootStored,
    /// About to send the first `sys/unseal`.
    BeforeUnseal,
    /// The first `sys/unseal` with a key sent; the proxy holds Vault's reply.
    DuringUnseal,
}

impl Step {
    fn all() -> Vec<Self> {
        let mut steps = vec![Self::InitSent, Self::InitAnswered, Self::JournalWritten];
        steps.extend((0..faults::SHARES).map(Self::KeyStored));
        steps.extend([Self::RootStored, Self::BeforeUnseal, Self::DuringUnseal]);
        steps
    }

    fn label(self) -> String {
        match self {
            Self::InitSent => "`sys/init` sent, reply not yet delivered".into(),
            Self::InitAnswered => "`sys/init` answered".into(),
            Self::JournalWritten => "journal written".into(),
            Self::KeyStored(i) => format!("`vault-unseal-{i}` stored"),
            Self::RootStored => "`vault-root` stored".into(),
            Self::BeforeUnseal => "before unseal".into(),
            Self::DuringUnseal => "during unseal (first `sys/unseal` in flight)".into(),
        }
    }

    /// Steps reached when the proxy holds a reply, rather than by a log line.
    fn hold(self) -> Option<Hold> {
        match self {
            Self::InitSent => Some(Hold::InitReply),
            Self::DuringUnseal => Some(Hold::FirstUnsealWithKey),
            _ => None,
        }
    }

    fn reached_by(self, line: &str) -> bool {
        match self {
            Self::InitAnswered => is_event(line, faults::INIT_ANSWERED),
            Self::JournalWritten => is_event(line, faults::JOURNAL_WRITTEN),
            Self::KeyStored(i) => {
                is_event(line, faults::KEY_STORED)
                    && has_field(line, "key", &format!("vault-unseal-{i}"))
            }
            Self::RootStored => is_event(line, faults::ROOT_STORED),
            Self::BeforeUnseal => is_event(line, faults::UNSEALING),
            Self::InitSent | Self::DuringUnseal => false,
        }
    }
}

/// What hits the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGTERM to unseal-init (pod deleted, node drained).
    Term,
    /// SIGKILL to unseal-init (OOM kill, node loss).
    Kill,
    /// SIGKILL to OpenBao, then OpenBao restarted on the same raft storage.
    KillVault,
    /// The pod deleted: SIGTERM to unseal-init and, after Vault's `preStop` hook, to
    /// OpenBao (which drops a request in flight), SIGKILL at the end of the grace period;
    /// then both started again on the same storage (the pod recreated).
    DeletePod,
}

/// A column: a fault, and whether unseal-init runs `--once` or as the sidecar (both for the
/// run that is hit and for the next start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Column {
    fault: Fault,
    once: bool,
}

const COLUMNS: [Column; 6] = [
    Column {
        fault: Fault::Term,
        once: true,
    },
    Column {
        fault: Fault::Term,
        once: false,
    },
    Column {
        fault: Fault::Kill,
        once: true,
    },
    Column {
        fault: Fault::Kill,
        once: false,
    },
    Column {
        fault: Fault::KillVault,
        once: false,
    },
    Column {
        fault: Fault::DeletePod,
        once: false,
    },
];

impl Column {
    fn label(self) -> String {
        let fault = match self.fault {
            Fault::Term => "SIGTERM unseal-init",
            Fault::Kill => "SIGKILL unseal-init",
            Fault::KillVault => "SIGKILL OpenBao",
            Fault::DeletePod => "pod deleted (SIGTERM to both, Vault's preStop, grace period)",
        };
        let mode = if self.once { "`--once`" } else { "sidecar" };
        format!("{fault}, {mode}")
    }
}

/// Whether OpenBao still runs, and the end of its log, for a failure report.
fn openbao_state(bao: &mut OpenBao) -> String {
    let log = bao.log_text();
    let tail: Vec<&str> = log.lines().rev().take(5).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    format!(
        "OpenBao {}; its last lines:\n{}",
        if bao.is_running() {
            "running"
        } else {
            "NOT running"
        },
        tail.join("\n")
    )
}

/// SIGKILLs OpenBao by pid, from whichever thread sees the step. The server is reaped only
/// later, by `OpenBao::kill` on the cell's own thread, so the pid is still the server's.
fn crash_openbao(pid: u32) {
    // SAFETY: kill(2) on a child of this process that has not been waited for.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// The window no client can close: the keys exist only in Vault's reply in flight, or only in
/// this process's memory before the journal is on disk.
fn documented_window(step: Step, fault: Fault) -> bool {
    fault == Fault::Kill && matches!(step, Step::InitSent | Step::InitAnswered)
}

/// How a cell ended.
#[derive(Debug)]
enum Outcome {
    /// Vault unsealed, all six values stored and correct, no journal left.
    Complete,
    /// Inside the documented window, Vault initialised and `stored` of six values kept.
    WindowLost { stored: usize },
    /// Anything else: a broken promise (or a broken scenario), explained.
    Failed(String),
}

impl Outcome {
    fn cell_text(&self) -> String {
        let total = faults::SHARES + 1;
        match self {
            Self::Complete => format!("unsealed, {total}/{total} keys"),
            Self::WindowLost { stored } => {
                format!("documented window: keys lost ({stored}/{total} stored)")
            }
            Self::Failed(_) => "**FAILED**".into(),
        }
    }
}

const STEP_TIMEOUT: Duration = Duration::from_secs(120);
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn exit_text(status: Option<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit {code}"),
            (None, Some(libc::SIGKILL)) => "killed (SIGKILL)".into(),
            (None, Some(libc::SIGABRT)) => "aborted (SIGABRT)".into(),
            (None, Some(libc::SIGSEGV)) => "crashed (SIGSEGV)".into(),
            (None, sig) => format!("killed by signal {sig:?}"),
        },
        None => "still running".into(),
    }
}

/// Sidecar config for everything: a short period, and endpoints on a port of its own since
/// many cells run at once. Returns the file and the endpoints' base URL.
fn cell_config(dir: &Path, hsm: &SoftHsm, vault: &str) -> (std::path::PathBuf, String) {
    let port = free_port().expect("port");
    let config = write_config(
        dir,
        hsm,
        vault,
        &format!("unsealPeriod: 300ms\nmetricsAddress: 127.0.0.1:{port}\n"),
    );
    (config, format!("http://127.0.0.1:{port}"))
}

/// The sidecar answers `/readyz` with 200 (it saw Vault unsealed, and its signal handling is
/// in place).
fn ready(endpoints: &str) -> bool {
    nitrokey_e2e::openbao::http(endpoints, "GET", "/readyz", None).is_ok_and(|(s, _)| s == 200)
}

/// Vault unsealed and the journal gone, polled.
fn settled(bao: &OpenBao, dir: &Path) -> bool {
    bao.seal_status().is_ok_and(|s| s.initialized && !s.sealed)
        && faults::journal_files(dir).is_empty()
}

/// Nothing left that could still bring the keys back: Vault initialised, the store short of
/// values, no journal, and the sidecar already complaining.
fn hopeless(bao: &OpenBao, hsm: &SoftHsm, dir: &Path, run: &Watched) -> bool {
    run.logged(|l| l.contains("ERROR"))
        && bao.seal_status().is_ok_and(|s| s.initialized && s.sealed)
        && faults::journal_files(dir).is_empty()
        && hsm
            .data_labels()
            .is_ok_and(|l| faults::init_names().iter().any(|n| !l.contains(n)))
}

/// Starts unseal-init again after the fault, in the column's mode, and lets it finish (the
/// sidecar: until it is ready or nothing can bring the keys back, then SIGTERM). Returns the
/// run and its exit status.
fn next_start(
    col: Column,
    bao: &OpenBao,
    hsm: &SoftHsm,
    dir: &Path,
    (config, endpoints): (&Path, &str),
) -> (Watched, Option<std::process::ExitStatus>) {
    let mut run = Watched::start(hsm, config, col.once, None);
    let status = if col.once {
        run.wait_exit(RUN_TIMEOUT)
    } else {
        poll(Duration::from_secs(90), || {
            (settled(bao, dir) && ready(endpoints)) || hopeless(bao, hsm, dir, &run)
        });
        run.signal(libc::SIGTERM);
        run.wait_exit(Duration::from_secs(60))
    };
    if status.is_none() {
        run.kill();
    }
    (run, status)
}

/// Runs one cell; returns its outcome and notes for the details list.
fn run_cell(step: Step, col: Column) -> (Outcome, String) {
    let hsm = SoftHsm::new().expect("softhsm token");
    let mut bao = OpenBao::start().expect("openbao");
    let dir = tempfile::tempdir().expect("tempdir");
    let tap = Arc::new(match step.hold() {
        Some(hold) => FaultTap::holding(hold),
        None => FaultTap::recording(),
    });
    let _release = ReleaseOnDrop(tap.clone());
    let proxy = proxy::start_tap(&bao.address(), tap.clone());
    let (config, endpoints) = cell_config(dir.path(), &hsm, &proxy.address);

    let bao_pid = bao.pid().expect("openbao pid");
    let fault = col.fault;
    let shipped = Shipped::read();
    let deletion = Arc::new(Mutex::new(Deletion::default()));
    let deleter: Arc<Mutex<Option<std::thread::JoinHandle<()>>>> = Arc::new(Mutex::new(None));
    let act = {
        let (tap, deletion, deleter) = (tap.clone(), deletion.clone(), deleter.clone());
        let hook = shipped.pre_stop_for(&common::journal_dir(dir.path()));
        let grace = shipped.grace;
        move |run: &Signaller| match fault {
            Fault::Term => run.send(libc::SIGTERM),
            Fault::Kill => run.send(libc::SIGKILL),
            Fault::KillVault => crash_openbao(bao_pid),
            Fault::DeletePod => {
                let handle = faults::delete_pod(
                    run,
                    bao_pid,
                    tap.clone(),
                    hook.clone(),
                    grace,
                    deletion.clone(),
                );
                if let Ok(mut d) = deleter.lock() {
                    *d = Some(handle);
                }
            }
        }
    };
    let act = Arc::new(act);
    let trigger = step.hold().is_none().then(|| {
        let act = act.clone();
        Trigger {
            matches: Box::new(move |line: &str| step.reached_by(line)),
            action: Box::new(move |run: &Signaller| act(run)),
        }
    });
    let mut run = Watched::start(&hsm, &config, col.once, trigger);

    let reached = if step.hold().is_some() {
        let held = poll(STEP_TIMEOUT, || {
            tap.wait_holding(Duration::from_millis(50)) || run.exited().is_some()
        }) && tap.wait_holding(Duration::ZERO);
        if held {
            act(&run.signaller());
        }
        held
    } else {
        poll(STEP_TIMEOUT, || run.fired() || run.exited().is_some());
        if !run.fired() && run.exited().is_some() {
            // The log may still be in the pipe when the exit is seen.
            run.wait_exit(Duration::from_secs(10));
        }
        run.fired()
    };
    if !reached {
        let status = run.exited();
        // Ends the log reader too, so that its trigger cannot fire any more.
        run.kill();
        return (
            Outcome::Failed(format!(
                "step never reached ({}); {}; last log lines:\n{}",
                exit_text(status),
                openbao_state(&mut bao),
                run.tail(15)
            )),
            String::new(),
        );
    }

    let mut problems: Vec<String> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    match fault {
        Fault::Term => {
            // Delivering a held reply only once the signal was seen shows the wait for it.
            poll(Duration::from_secs(20), || {
                run.logged(|l| is_event(l, faults::SIGTERM_RECEIVED)) || run.exited().is_some()
            });
            tap.release();
            let status = run.wait_exit(RUN_TIMEOUT);
            notes.push(format!("SIGTERM'd run {}", exit_text(status)));
            if status.is_none() {
                run.kill();
            }
            if status.and_then(|s| s.code()) != Some(0) {
                problems.push(format!("after SIGTERM: {}", exit_text(status)));
            }
            if !run.logged(|l| is_event(l, faults::SIGTERM_RECEIVED)) {
                problems.push("no `SIGTERM received` line".into());
            }
            // The SIGTERM'd run itself must have stored everything before it exited.
            match (
                Evidence::collect(&bao, &hsm, dir.path()),
                tap.init_replies().last(),
            ) {
                (Ok(ev), Some(reply)) => {
                    if let Err(e) = ev.complete(reply) {
                        problems.push(format!("when the SIGTERM'd run exited: {e}"));
                    }
                }
                (Err(e), _) => problems.push(e),
                (Ok(_), None) => problems.push("sys/init never answered".into()),
            }
        }
        Fault::Kill => {
            let status = run.wait_exit(Duration::from_secs(10));
            notes.push(format!("killed run {}", exit_text(status)));
            tap.release();
        }
        Fault::DeletePod => {
            // A slow Vault answers after all, unless it was stopped first.
            poll(Duration::from_secs(20), || {
                run.logged(|l| is_event(l, faults::SIGTERM_RECEIVED)) || run.exited().is_some()
            });
            tap.release();
            // The kubelet SIGKILLs whatever still runs when the grace period ends.
            let status = run.wait_exit(shipped.grace);
            if status.is_none() {
                run.kill();
                problems.push("unseal-init outlived the grace period (SIGKILL)".into());
            }
            notes.push(format!("deleted pod's unseal-init {}", exit_text(status)));
            if status.and_then(|s| s.code()) != Some(0) {
                problems.push(format!("after the pod deletion: {}", exit_text(status)));
            }
            let handle = deleter.lock().ok().and_then(|mut d| d.take());
            if let Some(h) = handle {
                let _ = h.join();
            }
            if !poll(shipped.grace, || !bao.is_running()) {
                crash_openbao(bao_pid);
                problems.push("OpenBao outlived the grace period (SIGKILL)".into());
            }
            let record = std::mem::take(&mut *deletion.lock().expect("deletion"));
            if let (Some(began), Some(stopped)) = (record.began, record.vault_stopped) {
                notes.push(format!(
                    "Vault's preStop returned after {} ms",
                    (stopped - began).as_millis()
                ));
                // While sys/init is unanswered, Vault may stop only once the answer is on disk.
                let journalled = run
                    .seen_at(|l| is_event(l, faults::JOURNAL_WRITTEN))
                    .first()
                    .copied();
                if matches!(step, Step::InitSent | Step::InitAnswered)
                    && journalled.is_none_or(|j| stopped < j)
                {
                    problems
                        .push("Vault was stopped before sys/init's answer was journalled".into());
                }
            }
            if record.hook_timed_out {
                problems.push("Vault's preStop hook ran out the grace period".into());
            }
            if tap.dropped() {
                notes.push("Vault dropped the request in flight".into());
            }
            if let Err(e) = bao.kill().and_then(|()| bao.start_again()) {
                return (
                    Outcome::Failed(format!("OpenBao did not come back: {e:#}")),
                    String::new(),
                );
            }
            // The deleted pod's unseal-init itself stored everything before it stopped.
            match (
                Evidence::collect(&bao, &hsm, dir.path()),
                tap.init_replies().last(),
            ) {
                (Ok(ev), Some(reply)) => {
                    if let Err(e) = ev.complete(reply) {
                        problems.push(format!("when the deleted pod's unseal-init exited: {e}"));
                    }
                }
                (Err(e), _) => problems.push(e),
                (Ok(_), None) => problems.push("sys/init never answered".into()),
            }
        }
        Fault::KillVault => {
            if let Err(e) = bao.kill().and_then(|()| bao.start_again()) {
                return (
                    Outcome::Failed(format!("OpenBao did not come back: {e:#}")),
                    String::new(),
                );
            }
            tap.release();
            let status = if col.once {
                run.wait_exit(RUN_TIMEOUT)
            } else {
                poll(Duration::from_secs(90), || settled(&bao, dir.path()));
                run.signal(libc::SIGTERM);
                run.wait_exit(Duration::from_secs(60))
            };
            if status.is_none() {
                run.kill();
            }
            notes.push(format!("run through the crash {}", exit_text(status)));
            if status.and_then(|s| s.code()) != Some(0) {
                problems.push(format!("run through the crash: {}", exit_text(status)));
            }
        }
    }
    let first_log = run.tail(20);
    drop(run);
    if let Some(reply) = tap.init_replies().last() {
        let leaks = faults::journal_leaks(dir.path(), reply);
        if !leaks.is_empty() {
            problems.push(format!("journal holds a secret in clear: {leaks:?}"));
        }
    }

    let (second, status) = next_start(col, &bao, &hsm, dir.path(), (&config, &endpoints));
    notes.push(format!("next start {}", exit_text(status)));
    if !documented_window(step, fault) && status.and_then(|s| s.code()) != Some(0) {
        problems.push(format!("next start: {}", exit_text(status)));
    }
    if second.logged(|l| is_event(l, faults::JOURNAL_RESUMED)) {
        notes.push("next start resumed the journal".into());
    }
    let replies = tap.init_replies();
    if replies.len() > 1 {
        notes.push(format!("{} sys/init replies", replies.len()));
    }
    let outcome = match (Evidence::collect(&bao, &hsm, dir.path()), replies.last()) {
        (Err(e), _) => Outcome::Failed(e),
        (Ok(_), None) => Outcome::Failed("sys/init never answered".into()),
        (Ok(ev), Some(reply)) => classify(step, fault, &ev, reply, problems),
    };
    if let Outcome::Failed(why) = outcome {
        let detail = format!(
            "{why}\n  {}; {}\n  run hit by the fault, last lines:\n{first_log}\n  next start, last lines:\n{}",
            notes.join("; "),
            openbao_state(&mut bao),
            second.tail(20)
        );
        return (Outcome::Failed(detail), notes.join("; "));
    }
    (outcome, notes.join("; "))
}

fn classify(
    step: Step,
    fault: Fault,
    ev: &Evidence,
    reply: &InitReply,
    mut problems: Vec<String>,
) -> Outcome {
    let complete = ev.complete(reply);
    if ev.initialized && !ev.sealed && complete.is_ok() && problems.is_empty() {
        return Outcome::Complete;
    }
    let kept = ev.matching(reply);
    if documented_window(step, fault)
        && problems.is_empty()
        && ev.initialized
        && kept < reply.named().len()
    {
        return Outcome::WindowLost { stored: kept };
    }
    if !ev.initialized {
        problems.push("Vault not initialised".into());
    } else if ev.sealed {
        problems.push("Vault still sealed".into());
    }
    if let Err(e) = complete {
        problems.push(e);
    }
    Outcome::Failed(problems.join("; "))
}

#[test]
fn no_unseal_key_is_lost_whatever_step_a_fault_hits() {
    let started = Instant::now();
    // `FAULT_MATRIX_COLUMNS=pod` runs only the columns whose label contains the text.
    let only = std::env::var("FAULT_MATRIX_COLUMNS").unwrap_or_default();
    let steps = Step::all();
    let cells: Vec<(Step, Column)> = matrix::cells(&steps, &COLUMNS)
        .into_iter()
        .filter(|(_, c)| c.label().contains(only.as_str()))
        .collect();
    let results = matrix::run_all(
        &cells,
        matrix::jobs("FAULT_MATRIX_JOBS", 8),
        |(step, col)| run_cell(step, col),
        |why| {
            (
                Outcome::Failed(format!("cell panicked: {why}")),
                String::new(),
            )
        },
    );

    println!(
        "\nFault matrix ({} cells, {:.0} s): the next start runs in the column's mode; `{}` keys means every `vault-unseal-N` and `vault-root` stored, decrypting (pkcs11-tool) to what `sys/init` returned, Vault unsealed, no journal left.\n",
        cells.len(),
        started.elapsed().as_secs_f64(),
        faults::SHARES + 1
    );
    let table = matrix::markdown(&steps, Step::label, &COLUMNS, Column::label, |s, c| {
        let i = cells.iter().position(|x| *x == (s, c))?;
        Some(results[i].0.cell_text())
    });
    println!("{table}");
    let mut failures = Vec::new();
    for ((step, col), (outcome, notes)) in cells.iter().zip(&results) {
        println!(
            "- {} / {}: {}; {notes}",
            step.label(),
            col.label(),
            outcome.cell_text()
        );
        if let Outcome::Failed(why) = outcome {
            failures.push(format!("{} / {}: {why}", step.label(), col.label()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cells broke the promise:\n\n{}",
        failures.len(),
        cells.len(),
        failures.join("\n\n")
    );
}

#[test]
fn init_reply_slower_than_any_client_timeout_still_ends_with_every_key_stored() {
    let hsm = SoftHsm::new().expect("softhsm token");
    let bao = OpenBao::start().expect("openbao");
    let dir = tempfile::tempdir().expect("tempdir");
    let tap = Arc::new(FaultTap::delaying_init(Duration::from_secs(31)));
    let _release = ReleaseOnDrop(tap.clone());
    let proxy = proxy::start_tap(&bao.address(), tap.clone());
    let (config, _) = cell_config(dir.path(), &hsm, &proxy.address);

    let mut run = Watched::start(&hsm, &config, true, None);
    let status = run.wait_exit(Duration::from_secs(180));
    if status.is_none() {
        run.kill();
    }
    assert!(tap.held(), "the sys/init reply was never held");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}:\n{}",
        exit_text(status),
        run.log()
    );
    let reply = tap
        .init_replies()
        .pop()
        .expect("sys/init answered through the proxy");
    let ev = Evidence::collect(&bao, &hsm, dir.path()).expect("evidence");
    assert!(ev.initialized && !ev.sealed, "{ev:?}\n{}", run.log());
    if let Err(e) = ev.complete(&reply) {
        panic!("{e}\n{}", run.log());
    }
}

#[test]
fn init_reply_with_fewer_keys_than_asked_is_reported_and_what_came_back_is_kept() {
    const RETURNED: usize = 3;
    let hsm = SoftHsm::new().expect("softhsm token");
    let bao = OpenBao::start().expect("openbao");
    let dir = tempfile::tempdir().expect("tempdir");
    let tap = Arc::new(FaultTap::rewriting_init(|body| {
        let Ok(mut v) = serde_json::from_str::<serde_json::Value>(body) else {
            return body.to_owned();
        };
        for field in ["keys", "keys_base64"] {
            if let Some(list) = v[field].as_array_mut() {
                list.truncate(RETURNED);
            }
        }
        v.to_string()
    }));
    let proxy = proxy::start_tap(&bao.address(), tap.clone());
    let (config, _) = cell_config(dir.path(), &hsm, &proxy.address);

    let mut run = Watched::start(&hsm, &config, true, None);
    let status = run.wait_exit(Duration::from_secs(120));
    if status.is_none() {
        run.kill();
    }
    let log = run.log();
    assert!(
        status.is_some_and(|s| s.code().is_some_and(|c| c != 0)),
        "a short sys/init reply must fail the run ({}):\n{log}",
        exit_text(status)
    );
    let shares = faults::SHARES.to_string();
    let returned = RETURNED.to_string();
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("sys/init")
            && l.contains(shares.as_str())
            && l.contains(returned.as_str())),
        "no error naming {RETURNED} keys returned for {} asked:\n{log}",
        faults::SHARES
    );

    // What Vault returned exists nowhere else: each of the three keys and the root token is
    // on the token or in the journal, decrypting to what Vault sent.
    let full = tap.init_replies().pop().expect("sys/init answered");
    let delivered = InitReply {
        keys: full.keys[..RETURNED].to_vec(),
        root_token: full.root_token.clone(),
        secrets: full.secrets.clone(),
    };
    let ev = Evidence::collect(&bao, &hsm, dir.path()).expect("evidence");
    let journaled = faults::journal_entries(&hsm, dir.path()).expect("readable journal");
    for (name, value) in delivered.named() {
        let on_token = ev
            .stored
            .get(&name)
            .is_some_and(|v| v.as_ref() == Ok(&value));
        let in_journal = journaled.get(&name) == Some(&value);
        assert!(
            on_token || in_journal,
            "{name}, returned by sys/init, is neither stored nor journaled (stored: {:?}, journaled: {:?})\n{log}",
            ev.stored.keys().collect::<Vec<_>>(),
            journaled.keys().collect::<Vec<_>>()
        );
    }
    assert!(
        faults::journal_leaks(dir.path(), &full).is_empty(),
        "the journal holds a secret in clear"
    );
    // Nothing Vault did not return was invented.
    for i in RETURNED..faults::SHARES {
        let name = format!("vault-unseal-{i}");
        assert!(
            !ev.stored.contains_key(&name) && !journaled.contains_key(&name),
            "{name} kept although sys/init did not return it"
        );
    }
}

/// How long the slow-init scenario holds `sys/init`'s answer: `SLOW_INIT_HOLD_SECS`, 150 s by
/// default (longer than the shipped probe's old limit of about 105–135 s).
fn slow_init_hold() -> Duration {
    Duration::from_secs(
        std::env::var("SLOW_INIT_HOLD_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(150),
    )
}

/// The shipped sidecar (its `unsealPeriod`) under the kubelet's liveness prober with the
/// shipped manifest's settings, while Vault takes 150 s to answer `sys/init`: `/healthz` never
/// fails (also probed every second), the container is never restarted, and every key is
/// stored.
#[test]
fn a_slow_init_under_the_shipped_liveness_probe_loses_nothing() {
    let shipped = Shipped::read();
    let hold = slow_init_hold();
    let hsm = SoftHsm::new().expect("softhsm token");
    let bao = OpenBao::start().expect("openbao");
    let dir = tempfile::tempdir().expect("tempdir");
    let tap = Arc::new(FaultTap::delaying_init(hold));
    let _release = ReleaseOnDrop(tap.clone());
    let proxy = proxy::start_tap(&bao.address(), tap.clone());
    let port = free_port().expect("port");
    let config = write_config(
        dir.path(),
        &hsm,
        &proxy.address,
        &format!(
            "unsealPeriod: {}\nmetricsAddress: 127.0.0.1:{port}\n",
            shipped.unseal_period
        ),
    );
    let endpoints = format!("http://127.0.0.1:{port}");

    let mut run = Watched::start(&hsm, &config, false, None);
    let kubelet = LivenessProber::start(run.signaller(), endpoints.clone(), &shipped);
    // The same probe every second, never acting: any failing answer at all is seen.
    let mut strict = shipped.clone();
    strict.liveness_period = Duration::from_secs(1);
    strict.liveness_failures = u32::MAX;
    let watcher = LivenessProber::start(run.signaller(), endpoints.clone(), &strict);

    let done = poll(hold + Duration::from_secs(120), || {
        (settled(&bao, dir.path()) && ready(&endpoints))
            || run.exited().is_some()
            || kubelet.restarted.load(std::sync::atomic::Ordering::SeqCst)
    });
    let (probes, failures) = (watcher.count(), watcher.failures());
    let (kubelet_probes, kubelet_failures) = (kubelet.count(), kubelet.failures());
    let restarted = kubelet.restarted.load(std::sync::atomic::Ordering::SeqCst);
    drop((kubelet, watcher));
    run.signal(libc::SIGTERM);
    let status = run.wait_exit(Duration::from_secs(60));
    let log = run.log();
    println!(
        "\nslow sys/init ({} s) under the shipped liveness probe (period {} s, failureThreshold {}, timeout {} s, unsealPeriod {}): {kubelet_probes} kubelet probes, {kubelet_failures} failed; {probes} probes at 1 s, {failures} failed; restarted: {restarted}",
        hold.as_secs(),
        shipped.liveness_period.as_secs(),
        shipped.liveness_failures,
        shipped.liveness_timeout.as_secs(),
        shipped.unseal_period
    );
    assert!(tap.held(), "the sys/init answer was never held");
    assert!(done, "neither unsealed nor ended:\n{log}");
    assert!(!restarted, "the kubelet would restart unseal-init:\n{log}");
    assert_eq!(
        failures, 0,
        "/healthz failed during the slow sys/init:\n{log}"
    );
    assert!(
        probes as u64 >= hold.as_secs() / 2,
        "too few probes: {probes}"
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}:\n{log}",
        exit_text(status)
    );
    let reply = tap.init_replies().pop().expect("sys/init answered");
    let ev = Evidence::collect(&bao, &hsm, dir.path()).expect("evidence");
    assert!(ev.initialized && !ev.sealed, "{ev:?}\n{log}");
    if let Err(e) = ev.complete(&reply) {
        panic!("{e}\n{log}");
    }
}

/// What Vault's `preStop` hook prevents: the pod deleted while `sys/init` is unanswered, and
/// Vault stopped at once. OpenBao drops the request and is initialised when it comes back;
/// unseal-init must not call that a success: it exits non-zero saying the keys are lost.
#[test]
fn a_pod_deletion_without_the_prestop_hook_is_reported_as_lost_keys() {
    let hsm = SoftHsm::new().expect("softhsm token");
    let mut bao = OpenBao::start().expect("openbao");
    let dir = tempfile::tempdir().expect("tempdir");
    let tap = Arc::new(FaultTap::holding(Hold::InitReply));
    let _release = ReleaseOnDrop(tap.clone());
    let proxy = proxy::start_tap(&bao.address(), tap.clone());
    let (config, _) = cell_config(dir.path(), &hsm, &proxy.address);
    let bao_pid = bao.pid().expect("openbao pid");

    let mut run = Watched::start(&hsm, &config, false, None);
    assert!(
        poll(STEP_TIMEOUT, || tap.wait_holding(Duration::from_millis(50))
            || run.exited().is_some()),
        "sys/init never sent:\n{}",
        run.log()
    );
    // Both containers stopped together, no hook: Vault closes the request it is answering.
    run.signal(libc::SIGTERM);
    tap.drop_held();
    // SAFETY: kill(2) on this test's own OpenBao child, not reaped yet.
    unsafe { libc::kill(bao_pid as i32, libc::SIGTERM) };
    let status = run.wait_exit(RUN_TIMEOUT);
    if status.is_none() {
        run.kill();
    }
    let log = run.log();
    assert!(tap.dropped(), "the held answer was delivered after all");
    assert!(
        status.and_then(|s| s.code()).is_some_and(|c| c != 0),
        "exited {} after losing sys/init's answer:\n{log}",
        exit_text(status)
    );
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("Vault may have initialised; its keys are lost")
            && l.contains("What to do")),
        "no error saying the keys are lost:\n{log}"
    );
    poll(Duration::from_secs(30), || !bao.is_running());
    bao.kill().expect("reap OpenBao");
    bao.start_again().expect("OpenBao back");
    let ev = Evidence::collect(&bao, &hsm, dir.path()).expect("evidence");
    println!(
        "\npod deleted without the preStop hook while sys/init was unanswered: unseal-init {}; OpenBao afterwards initialized={} sealed={}; {} of {} values stored",
        exit_text(status),
        ev.initialized,
        ev.sealed,
        ev.stored.len(),
        faults::SHARES + 1
    );
    assert!(
        ev.initialized && ev.stored.is_empty(),
        "expected an initialised Vault whose keys nobody holds: {ev:?}"
    );
}

/// A broken or hostile Vault answering `sys/init` with 500 keys for the 5 asked: the token gets
/// at most what was asked (a stick is full long before 502 objects), everything is kept
/// encrypted in the journal directory, the mismatch is an error naming both counts, and the
/// next start unseals with the keys stored.
#[test]
fn init_reply_with_more_keys_than_asked_stores_only_those_asked() {
    const RETURNED: usize = 500;
    let hsm = SoftHsm::new().expect("softhsm token");
    let bao = OpenBao::start().expect("openbao");
    let dir = tempfile::tempdir().expect("tempdir");
    let tap = Arc::new(FaultTap::rewriting_init(|body| {
        let Ok(mut v) = serde_json::from_str::<serde_json::Value>(body) else {
            return body.to_owned();
        };
        if let Some(list) = v["keys"].as_array_mut() {
            while list.len() < RETURNED {
                // Hex strings of an unseal key's shape that unseal nothing.
                list.push(serde_json::Value::String(format!("{:066x}", list.len())));
            }
        }
        v.to_string()
    }));
    let proxy = proxy::start_tap(&bao.address(), tap.clone());
    let (config, _) = cell_config(dir.path(), &hsm, &proxy.address);

    let mut run = Watched::start(&hsm, &config, true, None);
    let status = run.wait_exit(Duration::from_secs(180));
    if status.is_none() {
        run.kill();
    }
    let log = run.log();
    assert!(
        status.is_some_and(|s| s.code() == Some(1)),
        "the mismatch must fail the run ({}):\n{log}",
        exit_text(status)
    );
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("asked for 5 unseal keys, Vault returned 500")
            && l.contains("the other 495 are kept")),
        "no error naming both counts:\n{log}"
    );
    let mut labels = hsm.data_labels().expect("labels");
    labels.sort();
    assert_eq!(labels, common::default_names(), "at most what was asked");
    let reply = tap.init_replies().pop().expect("sys/init answered");
    let ev = Evidence::collect(&bao, &hsm, dir.path()).expect("evidence");
    let kept: Vec<_> = ev
        .journal
        .iter()
        .filter(|p| p.to_string_lossy().contains("unstored-keys"))
        .collect();
    assert_eq!(kept.len(), 1, "{:?}", ev.journal);
    let journaled = faults::journal_entries(&hsm, dir.path()).expect("readable journal");
    assert_eq!(
        journaled.len(),
        RETURNED + 1,
        "every key and the root token kept"
    );
    for (name, value) in reply.named() {
        assert_eq!(journaled.get(&name), Some(&value), "{name}");
        assert_eq!(ev.stored.get(&name), Some(&Ok(value)), "{name} stored");
    }
    assert!(faults::journal_leaks(dir.path(), &reply).is_empty());

    // The next start unseals with the five stored keys and leaves the kept file alone.
    let mut next = Watched::start(&hsm, &config, true, None);
    let status = next.wait_exit(Duration::from_secs(120));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", next.log());
    assert!(!bao.seal_status().expect("status").sealed);
    assert_eq!(faults::journal_files(dir.path()).len(), 1);
}
