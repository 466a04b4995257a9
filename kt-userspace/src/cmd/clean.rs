//! `ktctl clean`: removes what sessions that are no longer alive left in the namespace and
//! restores what they changed, without ever touching a live session. `--dryRun` says what it
//! would do; `--localOnly` cleans this machine only (pid files of ended ktctl processes).

use crate::cli::{CleanArgs, Global};
use crate::cluster::Kube;
use crate::cluster::leftovers::{self, Step, Survey};
use crate::error::Result;

/// kt-connect's words for "nothing to clean".
pub const NOTHING: &str = "No unavailing kt resource found (^.^)YYa!!";

pub async fn run(global: &Global, args: &CleanArgs) -> Result<u8> {
    if args.local_only {
        return clean_local(args.dry_run);
    }
    let kube = super::connect_kube(global).await?;
    kube.require_from(
        leftovers::PERMISSIONS,
        "deploy/rbac-connect.yaml with deploy/rbac-inbound.yaml",
    )
    .await?;
    let survey = Survey::take(&kube).await?;
    let threshold = i64::try_from(args.threshold_in_minus * 60).unwrap_or(i64::MAX);
    // Never less than twice the session's grace: its shadow gets the first chance, and a
    // session whose renewals are merely late is not dead.
    let steps = survey.clean(|a| a.alive_within(threshold.max(2 * a.grace_secs)));
    if steps.is_empty() {
        tracing::info!("{NOTHING}");
        return Ok(0);
    }
    if args.dry_run {
        for s in &steps {
            tracing::info!("{}", s.describe(false));
        }
        return Ok(0);
    }
    apply_all(&kube, &steps).await
}

/// Runs the steps in order, saying what each did; exit 1 if any failed (the others still run).
pub async fn apply_all(kube: &Kube, steps: &[Step]) -> Result<u8> {
    let mut failed = 0;
    for s in steps {
        match leftovers::apply(kube, s).await {
            Ok(true) => tracing::info!("{}", s.describe(true)),
            Ok(false) => tracing::debug!(step = ?s, "already done by someone else"),
            Err(e) => {
                failed += 1;
                tracing::error!("{}: {e}", s.describe(false));
            }
        }
    }
    Ok(u8::from(failed > 0))
}

fn clean_local(dry_run: bool) -> Result<u8> {
    let removed = crate::pidfile::clean_stale(dry_run)?;
    if removed.is_empty() {
        tracing::info!("{NOTHING}");
    }
    for p in removed {
        let verb = if dry_run { "Would remove" } else { "Removed" };
        tracing::info!("{verb} {} (its process has ended)", p.display());
    }
    Ok(0)
}
