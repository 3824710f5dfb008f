//! Benchmark: how long Vault stays sealed once unseal-init acts, split into time spent in the
//! HSM (PKCS#11 calls) and everything else (Vault HTTP, host RSA, bookkeeping), plus how many
//! HSM operations one init and one unseal cost. Runs against a SoftHSM2 token and a real
//! OpenBao server; prints figures (no pass/fail).
//!
//! `cargo bench -p nitrokey-unseal-init --bench unseal` (UNSEAL_BENCH_ROUNDS sets the number
//! of unseal rounds, default 10).

use nitrokey_e2e::openbao::OpenBao;
use nitrokey_e2e::softhsm::{SoftHsm, USER_PIN};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use unseal_init::cli::Overrides;
use unseal_init::config::{self, Env};
use unseal_init::runner::{Runner, open_keyring};
use unseal_init::telemetry::{OpTotals, Telemetry};
use unseal_init::vault::VaultClient;

type Totals = BTreeMap<&'static str, OpTotals>;

fn delta(before: &Totals, after: &Totals) -> (u64, Duration, BTreeMap<&'static str, u64>) {
    let mut count = 0;
    let mut time = Duration::ZERO;
    let mut by_op = BTreeMap::new();
    for (op, a) in after {
        let b = before.get(op).copied().unwrap_or_default();
        let c = a.count - b.count;
        if c > 0 {
            by_op.insert(*op, c);
        }
        count += c;
        time += a.time - b.time;
    }
    (count, time, by_op)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::var("UNSEAL_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let hsm = SoftHsm::new()?;
    let mut bao = OpenBao::start()?;
    for (k, v) in hsm.env() {
        // SAFETY: set before any thread is started.
        unsafe { std::env::set_var(k, v) };
    }
    let yaml = format!(
        "vault:\n  address: {}\nhsm:\n  modulePath: {}\n  slotId: {}\n  pin: {USER_PIN}\n",
        bao.address(),
        hsm.module().display(),
        hsm.slot_id()
    );
    let file = config::parse_file(&yaml).map_err(anyhow::Error::msg)?;
    let mut cfg = config::resolve(file, &Overrides::default(), &Env::default())?;
    cfg.once = true;
    let rt = tokio::runtime::Runtime::new()?;
    let telemetry = Telemetry::new();

    let t0 = Instant::now();
    let before = telemetry.hsm_totals();
    let (_hsm, keyring) = rt.block_on(open_keyring(&cfg, telemetry.clone()))?;
    let vault = VaultClient::new(&cfg.vault.address, None)?.with_telemetry(telemetry.clone());
    let runner = Runner::new(cfg.clone(), vault, keyring, telemetry.clone());
    rt.block_on(runner.preflight())?;
    let startup = t0.elapsed();
    let (startup_ops, startup_hsm, startup_by) = delta(&before, &telemetry.hsm_totals());

    let before = telemetry.hsm_totals();
    let vault_before = telemetry.vault_totals();
    let t0 = Instant::now();
    rt.block_on(runner.pass(true))?;
    let init = t0.elapsed();
    let (init_ops, init_hsm, init_by) = delta(&before, &telemetry.hsm_totals());
    let (_, init_vault, _) = delta(&vault_before, &telemetry.vault_totals());
    anyhow::ensure!(!bao.seal_status()?.sealed, "init pass left Vault sealed");

    let mut totals = Vec::new();
    let mut hsm_times = Vec::new();
    let mut vault_times = Vec::new();
    let mut unseal_by = BTreeMap::new();
    let mut unseal_ops = 0;
    for _ in 0..rounds {
        bao.restart()?;
        anyhow::ensure!(bao.seal_status()?.sealed, "restarted server is not sealed");
        let before = telemetry.hsm_totals();
        let vault_before = telemetry.vault_totals();
        let t0 = Instant::now();
        rt.block_on(runner.pass(true))?;
        totals.push(t0.elapsed());
        vault_times.push(delta(&vault_before, &telemetry.vault_totals()).1);
        let (ops, time, by) = delta(&before, &telemetry.hsm_totals());
        hsm_times.push(time);
        unseal_ops = ops;
        unseal_by = by;
        anyhow::ensure!(!bao.seal_status()?.sealed, "unseal pass left Vault sealed");
    }
    let mean = |v: &[Duration]| v.iter().sum::<Duration>() / v.len().max(1) as u32;
    let median = |v: &[Duration]| {
        let mut s = v.to_vec();
        s.sort();
        s[s.len() / 2]
    };

    println!(
        "unseal-init benchmark (SoftHSM2 2.6 token, OpenBao 2.7 single-node raft, 5 shares / threshold 3)"
    );
    println!();
    println!(
        "start-up (module, login, key lookup, scheme probe, pre-flight): {:.1} ms total, {:.1} ms in HSM; {startup_ops} HSM ops {startup_by:?}",
        ms(startup),
        ms(startup_hsm)
    );
    println!(
        "init pass (sys/init, store 5 keys + root token with read-back, unseal): {:.1} ms total = {:.1} ms HSM + {:.1} ms Vault API + {:.1} ms rest; {init_ops} HSM ops {init_by:?}",
        ms(init),
        ms(init_hsm),
        ms(init_vault),
        ms(init.saturating_sub(init_hsm + init_vault))
    );
    let (m, mh, mv) = (median(&totals), median(&hsm_times), median(&vault_times));
    println!(
        "sealed -> unsealed over {rounds} restarts: median {:.1} ms (mean {:.1} ms) = HSM {:.1} ms + Vault API {:.1} ms + rest {:.1} ms (medians); {unseal_ops} HSM ops per unseal {unseal_by:?}",
        ms(m),
        ms(mean(&totals)),
        ms(mh),
        ms(mv),
        ms(m.saturating_sub(mh + mv))
    );
    Ok(())
}
