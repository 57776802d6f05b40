//! Store tests, including real crashes: a child process (this test binary,
//! re-executed) runs a job against the store and calls
//! `std::process::abort()` — no destructors, no clean shutdown, like
//! `kill -9` — after its k-th checkpoint; the parent reopens the data
//! directory, recovers and finishes the job.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::time::{Duration, Instant};

use fedlink_protocol::{FlatModel, ModelSpec, TensorSpec};

use super::*;
use crate::round::sim::{Sim, SimHooks, SiteScript};
use crate::round::{JobRunner, RoundConfig, RoundId};

const JOB: &str = r#"
id = "crash-job"
rounds = 3
seed = 5
arch = { kind = "logreg", inputs = 3, classes = 2 }
init = { seed = 1 }
[strategy]
name = "fedavg"
[selection]
min_sites = 3
gather_secs = 1
[round]
deadline_secs = 60
quorum = 3
"#;

/// A site id the test knows to be valid.
fn sid(s: &str) -> SiteId {
    SiteId::new(s).unwrap()
}

fn model(values: Vec<f32>) -> FlatModel {
    let spec = ModelSpec::new(vec![
        TensorSpec::f32("fc.weight", vec![3, 2]),
        TensorSpec::f32("fc.bias", vec![2]),
    ])
    .unwrap();
    FlatModel::new(spec, values).unwrap()
}

fn initial() -> FlatModel {
    model((0..8).map(|i| i as f32 * 0.25).collect())
}

fn job() -> Job {
    Job::from_toml(JOB).unwrap()
}

/// A store with the job created.
fn fresh(dir: &Path) -> Store {
    let store = Store::open(dir).unwrap();
    let h = store.put_model(&initial()).unwrap();
    store.create_job(&job(), h).unwrap();
    store
}

/// Driver hooks backed by a real store: checkpoints are persisted, models
/// are computed from the base model and written as files.
struct StoreHooks {
    store: Rc<Store>,
    persists: Rc<RefCell<usize>>,
    abort_after_persist: Option<usize>,
    abort_after_model_of_round: Option<u64>,
}

impl SimHooks for StoreHooks {
    fn persist(&mut self, checkpoint: &Checkpoint) {
        let opt = match checkpoint {
            Checkpoint::RoundCompleted { round, .. } => Some(round.0.to_le_bytes()),
            _ => None,
        };
        let extras = Extras {
            optimizer_state: opt.as_ref().map(|b| b.as_slice()),
            replay_state: Some(("sites", b"guard")),
        };
        self.store.persist("crash-job", checkpoint, extras).unwrap();
        // What the engine does after these checkpoints: annotations of the
        // round that are not fsynced on their own (they ride on the next
        // checkpoint; `check_finished` wants them in every completed round).
        match checkpoint {
            Checkpoint::RoundStarted { round, .. } => {
                self.store
                    .set_round_times("crash-job", *round, Some(1_000 + round.0), None)
                    .unwrap();
            }
            Checkpoint::UpdateAccepted(acc) => {
                let detail = UpdateDetail {
                    site: acc.site.to_string(),
                    payload_hash: acc.payload_hash.to_hex(),
                    bytes: acc.bytes,
                    upload_ms: 7,
                    metrics: None,
                    at_unix_ms: acc.received_unix_ms,
                };
                self.store
                    .record_update_detail("crash-job", acc.round, detail)
                    .unwrap();
            }
            _ => {}
        }
        *self.persists.borrow_mut() += 1;
        if Some(*self.persists.borrow()) == self.abort_after_persist {
            std::process::abort();
        }
    }

    fn aggregate(
        &mut self,
        round: RoundId,
        base_model: ModelHash,
        updates: &[AcceptedUpdate],
    ) -> Option<ModelHash> {
        let mut m = self.store.load_model(&base_model).unwrap();
        for v in m.values_mut() {
            *v += round.0 as f32 + 0.5 * updates.len() as f32;
        }
        let h = self.store.put_model(&m).unwrap();
        self.store
            .set_round_times("crash-job", round, None, Some(2_000 + round.0))
            .unwrap();
        if self.abort_after_model_of_round == Some(round.0) {
            std::process::abort();
        }
        Some(h)
    }
}

fn sites() -> Vec<SiteScript> {
    ["h1", "h2", "h3"]
        .iter()
        .enumerate()
        .map(|(i, s)| SiteScript::honest(sid(s), Duration::from_secs(2 + i as u64)))
        .collect()
}

/// Run (or resume) the job in the store to its end, or until an abort.
fn run(store: Rc<Store>, abort_after_persist: Option<usize>, abort_round: Option<u64>) -> usize {
    let rec = store.recover("crash-job").unwrap();
    let runner = JobRunner::resume(RoundConfig::from_job(&rec.job), rec.snapshot);
    let persists = Rc::new(RefCell::new(0));
    let hooks = StoreHooks {
        store,
        persists: persists.clone(),
        abort_after_persist,
        abort_after_model_of_round: abort_round,
    };
    let mut sim = Sim::with_hooks(runner, sites(), Instant::now(), Box::new(hooks));
    sim.drive(Duration::from_secs(3600));
    *persists.borrow()
}

/// Everything a finished job must satisfy.
fn check_finished(store: &Store) {
    let rec = store.job("crash-job").unwrap().unwrap();
    assert_eq!(rec.completed_rounds, 3);
    let Some(JobOutcome::Completed { model }) = rec.outcome else {
        panic!("{:?}", rec.outcome);
    };
    assert_eq!(model, rec.current_model);
    let rounds = store.rounds("crash-job").unwrap();
    assert_eq!(rounds.len(), 3);
    let mut base = rec.initial_model;
    for r in &rounds {
        assert_eq!(r.state, RoundState::Completed);
        assert_eq!(r.base_model, base, "round {}", r.round);
        let sites: BTreeSet<_> = r.accepted.iter().map(|u| u.site.as_str()).collect();
        assert_eq!(sites.len(), r.accepted.len(), "site counted twice");
        assert_eq!(r.accepted.len(), 3);
        // The annotations committed without an fsync of their own are in
        // every completed round: the round's later checkpoints carried them,
        // whichever checkpoint a crash came after.
        for u in &r.accepted {
            assert!(
                r.update_details.iter().any(|d| d.site == u.site.as_str()),
                "round {}: no detail of {}'s update",
                r.round,
                u.site
            );
        }
        assert_eq!(r.opened_unix_ms, Some(1_000 + r.round), "round {}", r.round);
        assert_eq!(r.closed_unix_ms, Some(2_000 + r.round), "round {}", r.round);
        let m = r.model.unwrap();
        store.load_model(&m).unwrap(); // present and hash-verified
        assert_eq!(
            store.model_record(&m).unwrap(),
            Some(ModelRecord {
                job: "crash-job".into(),
                round: r.round
            })
        );
        base = m;
    }
    assert_eq!(base, rec.current_model);
    // Deterministic model chain: 3 updates per round.
    let final_model = store.load_model(&rec.current_model).unwrap();
    let expect: Vec<f32> = initial()
        .values()
        .iter()
        .map(|v| v + (1.0 + 1.5) + (2.0 + 1.5) + (3.0 + 1.5))
        .collect();
    assert_eq!(final_model.values(), &expect[..]);
    assert_eq!(
        store.optimizer_state("crash-job").unwrap(),
        Some(3u64.to_le_bytes().to_vec())
    );
    for s in ["h1", "h2", "h3"] {
        assert!(store.site(s).unwrap().unwrap().updates_aggregated >= 3);
    }
}

const CHILD_DIR: &str = "FEDLINK_TEST_CRASH_DIR";
const CHILD_AFTER: &str = "FEDLINK_TEST_CRASH_AFTER";
const CHILD_ROUND: &str = "FEDLINK_TEST_CRASH_ROUND";

/// In the child: run the job and abort as told. Never returns.
fn child_main(dir: &str) -> ! {
    let after = std::env::var(CHILD_AFTER).ok().and_then(|s| s.parse().ok());
    let round = std::env::var(CHILD_ROUND).ok().and_then(|s| s.parse().ok());
    let store = Rc::new(Store::open(Path::new(dir)).unwrap());
    run(store, after, round);
    // Finished without aborting: exit with a distinctive code.
    std::process::exit(42);
}

fn crash_child(dir: &Path, after: Option<usize>, round: Option<u64>) -> std::process::ExitStatus {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        "--exact",
        "store::tests::kill_at_every_checkpoint_then_recover",
        "--test-threads=1",
        "--quiet",
    ])
    .env(CHILD_DIR, dir)
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    if let Some(a) = after {
        cmd.env(CHILD_AFTER, a.to_string());
    }
    if let Some(r) = round {
        cmd.env(CHILD_ROUND, r.to_string());
    }
    cmd.status().unwrap()
}

#[test]
fn kill_at_every_checkpoint_then_recover() {
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        child_main(&dir);
    }
    // How many checkpoints a clean run makes.
    let clean = tempfile::tempdir().unwrap();
    let total = {
        let store = Rc::new(fresh(clean.path()));
        let n = run(store.clone(), None, None);
        check_finished(&store);
        n
    };
    // 3 rounds × (RoundStarted + 3 UpdateAccepted + RoundCompleted) + JobFinished.
    assert_eq!(total, 16);
    for k in 1..total {
        let dir = tempfile::tempdir().unwrap();
        drop(fresh(dir.path()));
        let status = crash_child(dir.path(), Some(k), None);
        assert!(
            !status.success() && status.code() != Some(42),
            "k={k}: {status:?}"
        );
        let store = Rc::new(Store::open(dir.path()).unwrap());
        let before = store.job("crash-job").unwrap().unwrap();
        let rec = store.recover("crash-job").unwrap();
        assert_eq!(rec.snapshot.completed_rounds, before.completed_rounds);
        assert_eq!(rec.model.hash(), before.current_model);
        if let Some(r) = rec.reopened_round {
            assert_eq!(r.0, before.completed_rounds + 1, "k={k}");
            let round = store.round("crash-job", r).unwrap().unwrap();
            assert!(round.accepted.is_empty());
            assert_eq!(round.discarded.len(), rec.discarded_updates.len());
        }
        run(store.clone(), None, None);
        check_finished(&store);
    }
}

#[test]
fn kill_after_model_write_before_round_commit() {
    let dir = tempfile::tempdir().unwrap();
    drop(fresh(dir.path()));
    let status = crash_child(dir.path(), None, Some(2));
    assert!(!status.success() && status.code() != Some(42), "{status:?}");
    let store = Rc::new(Store::open(dir.path()).unwrap());
    let rec = store.recover("crash-job").unwrap();
    // Round 2's model file exists but round 2 is not completed: it re-runs,
    // its three updates of the crashed run are discarded.
    assert_eq!(rec.snapshot.completed_rounds, 1);
    assert_eq!(rec.reopened_round, Some(RoundId(2)));
    assert_eq!(rec.discarded_updates.len(), 3);
    run(store.clone(), None, None);
    check_finished(&store);
    let r2 = store.round("crash-job", RoundId(2)).unwrap().unwrap();
    assert_eq!(r2.restarts, 1);
    assert_eq!(r2.discarded.len(), 3);
}

#[test]
fn drop_mid_round_then_recover_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let store = fresh(dir.path());
    let init = store.job("crash-job").unwrap().unwrap().current_model;
    let sel: Vec<SiteId> = vec![sid("h1"), sid("h2"), sid("h3")];
    store
        .persist(
            "crash-job",
            &Checkpoint::RoundStarted {
                round: RoundId(1),
                attempt: 1,
                base_model: init,
                selected: sel,
            },
            Extras::default(),
        )
        .unwrap();
    let up = |site: &str| AcceptedUpdate {
        site: sid(site),
        round: RoundId(1),
        payload_hash: ModelHash([7; 32]),
        num_examples: 10,
        bytes: 100,
        received_unix_ms: 1,
    };
    store
        .persist(
            "crash-job",
            &Checkpoint::UpdateAccepted(up("h1")),
            Extras::default(),
        )
        .unwrap();
    // The same site again is refused: never counted twice.
    assert!(matches!(
        store.persist(
            "crash-job",
            &Checkpoint::UpdateAccepted(up("h1")),
            Extras::default()
        ),
        Err(StoreError::Inconsistent { .. })
    ));
    drop(store); // no shutdown step exists: every commit is already durable
    let store = Store::open(dir.path()).unwrap();
    let rec = store.recover("crash-job").unwrap();
    assert_eq!(rec.snapshot.completed_rounds, 0);
    assert_eq!(rec.reopened_round, Some(RoundId(1)));
    assert_eq!(rec.discarded_updates, vec![up("h1")]);
    // After recovery h1 may report round 1 again (the re-run is a new run).
    store
        .persist(
            "crash-job",
            &Checkpoint::RoundStarted {
                round: RoundId(1),
                attempt: 1,
                base_model: init,
                selected: vec![sid("h1")],
            },
            Extras::default(),
        )
        .unwrap();
    store
        .persist(
            "crash-job",
            &Checkpoint::UpdateAccepted(up("h1")),
            Extras::default(),
        )
        .unwrap();
    let r1 = store.round("crash-job", RoundId(1)).unwrap().unwrap();
    assert_eq!(r1.accepted, vec![up("h1")]);
    assert_eq!(r1.discarded, vec![up("h1")]);
}

#[test]
fn inconsistent_checkpoints_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = fresh(dir.path());
    let init = store.job("crash-job").unwrap().unwrap().current_model;
    let before = store.job("crash-job").unwrap();
    // Round 2 before round 1; wrong base model; unknown job.
    let bad = [
        Checkpoint::RoundStarted {
            round: RoundId(2),
            attempt: 1,
            base_model: init,
            selected: vec![],
        },
        Checkpoint::RoundStarted {
            round: RoundId(1),
            attempt: 1,
            base_model: ModelHash([1; 32]),
            selected: vec![],
        },
        Checkpoint::UpdateAccepted(AcceptedUpdate {
            site: sid("h1"),
            round: RoundId(1),
            payload_hash: ModelHash([0; 32]),
            num_examples: 1,
            bytes: 1,
            received_unix_ms: 0,
        }),
    ];
    for c in &bad {
        assert!(matches!(
            store.persist("crash-job", c, Extras::default()),
            Err(StoreError::Inconsistent { .. })
        ));
    }
    assert!(matches!(
        store.persist("nope", &bad[0], Extras::default()),
        Err(StoreError::UnknownJob(_))
    ));
    // A round cannot complete with a model that is not on disk.
    store
        .persist(
            "crash-job",
            &Checkpoint::RoundStarted {
                round: RoundId(1),
                attempt: 1,
                base_model: init,
                selected: vec![],
            },
            Extras::default(),
        )
        .unwrap();
    let missing = ModelHash([9; 32]);
    assert!(matches!(
        store.persist(
            "crash-job",
            &Checkpoint::RoundCompleted {
                round: RoundId(1),
                model: missing,
                updates: vec![],
                metrics: BTreeMap::new()
            },
            Extras::default()
        ),
        Err(StoreError::ModelMissing(h)) if h == missing
    ));
    assert_eq!(
        store.job("crash-job").unwrap().unwrap().completed_rounds,
        before.unwrap().completed_rounds
    );
}

#[test]
fn jobs_are_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let store = fresh(dir.path());
    let h = initial().hash();
    assert!(matches!(
        store.create_job(&job(), h),
        Err(StoreError::JobExists(_))
    ));
    let mut other = job();
    other.id = "other".into();
    assert!(matches!(
        store.create_job(&other, ModelHash([3; 32])),
        Err(StoreError::ModelMissing(_))
    ));
    store.create_job(&other, h).unwrap();
    let ids: Vec<String> = store.jobs().unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(ids, vec!["crash-job".to_owned(), "other".to_owned()]);
    assert_eq!(store.recover("other").unwrap().job, other);
}

#[test]
fn model_files_round_trip_and_are_content_addressed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let store = Store::open(&dir).unwrap();
    let m = initial();
    let h = store.put_model(&m).unwrap();
    assert_eq!(h, m.hash());
    assert_eq!(
        store.model_path(&h),
        dir.join("models").join(format!("{}.bin", h.to_hex()))
    );
    assert_eq!(store.load_model(&h).unwrap(), m);
    // Idempotent.
    assert_eq!(store.put_model(&m).unwrap(), h);
    assert!(matches!(
        store.load_model(&ModelHash([0; 32])),
        Err(StoreError::ModelMissing(_))
    ));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(store.model_path(&h))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o} {}", dir.display());
    }
}

#[test]
fn corrupted_model_files_are_detected_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let m = initial();
    let h = store.put_model(&m).unwrap();
    let path = store.model_path(&h);
    let good = fs::read(&path).unwrap();

    // One flipped bit in the values.
    let mut bytes = good.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    let err = store.load_model(&h).unwrap_err();
    assert!(
        matches!(&err, StoreError::ModelCorrupt { reason, .. } if reason.contains("hash")),
        "{err}"
    );
    // Truncated.
    fs::write(&path, &good[..good.len() - 3]).unwrap();
    assert!(matches!(
        store.load_model(&h),
        Err(StoreError::ModelCorrupt { .. })
    ));
    // Garbage header, absurd spec length.
    fs::write(&path, b"FLMODEL1\xff\xff\xff\xffxx").unwrap();
    assert!(matches!(
        store.load_model(&h),
        Err(StoreError::ModelCorrupt { .. })
    ));
    fs::write(&path, b"nope").unwrap();
    assert!(matches!(
        store.load_model(&h),
        Err(StoreError::ModelCorrupt { .. })
    ));
    // Writing the model again repairs the file.
    assert_eq!(store.put_model(&m).unwrap(), h);
    assert_eq!(store.load_model(&h).unwrap(), m);
}

#[test]
fn the_base_read_into_the_update_is_bit_for_bit_the_base_plus_the_update() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // Several read pieces and a short last one; values of every magnitude.
    let n = 2 * MODEL_READ_PIECE + 1234;
    let spec = ModelSpec::new(vec![TensorSpec::f32("w", vec![n as u64])]).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let exp = (state >> 40) % 40;
        let v = ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 2f64.powi(exp as i32 - 20);
        v as f32
    };
    let base = FlatModel::new(spec.clone(), (0..n).map(|_| next()).collect()).unwrap();
    let update = FlatModel::new(spec.clone(), (0..n).map(|_| next()).collect()).unwrap();
    let h = store.put_model(&base).unwrap();

    let mut want = store.load_model(&h).unwrap();
    for (x, u) in want.values_mut().iter_mut().zip(update.values()) {
        *x += *u;
    }
    let mut got = update.clone();
    store.add_model_to(&h, &mut got).unwrap();
    let bits = |m: &FlatModel| m.values().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got), bits(&want));
    assert_eq!(got.hash(), want.hash());

    // A missing base, a base of another spec, a corrupt base: errors that
    // name it (the update is then to be discarded).
    let mut u = update.clone();
    assert!(matches!(
        store.add_model_to(&ModelHash([0; 32]), &mut u),
        Err(StoreError::ModelMissing(_))
    ));
    let small = store.put_model(&initial()).unwrap();
    let err = store.add_model_to(&small, &mut u).unwrap_err();
    assert!(
        matches!(&err, StoreError::ModelCorrupt { reason, .. } if reason.contains("spec")),
        "{err}"
    );
    let path = store.model_path(&h);
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    let err = store.add_model_to(&h, &mut u).unwrap_err();
    assert!(
        matches!(&err, StoreError::ModelCorrupt { reason, .. } if reason.contains("hash")),
        "{err}"
    );
    fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
    assert!(matches!(
        store.add_model_to(&h, &mut u),
        Err(StoreError::ModelCorrupt { .. })
    ));
}

#[test]
fn torn_model_write_is_cleaned_up_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let m = initial();
    let hex = m.hash().to_hex();
    // A crash between create and rename leaves a partial temp file.
    let tmp = dir.path().join("models").join(format!(".tmp-{hex}-1-0"));
    fs::write(&tmp, b"FLMODEL1\x10\x00").unwrap();
    assert!(!store.has_model(&m.hash()));
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert!(!tmp.exists());
    let names: Vec<_> = fs::read_dir(dir.path().join("models")).unwrap().collect();
    assert!(names.is_empty());
    store.put_model(&m).unwrap();
    assert!(store.has_model(&m.hash()));
}

#[test]
fn recovery_refuses_a_corrupt_current_model() {
    let dir = tempfile::tempdir().unwrap();
    let store = fresh(dir.path());
    let h = initial().hash();
    fs::write(store.model_path(&h), b"garbage").unwrap();
    assert!(matches!(
        store.recover("crash-job"),
        Err(StoreError::ModelCorrupt { .. })
    ));
    fs::remove_file(store.model_path(&h)).unwrap();
    assert!(matches!(
        store.recover("crash-job"),
        Err(StoreError::ModelMissing(_))
    ));
}

#[test]
fn site_registry_and_opaque_state() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.record_site_seen(&sid("h1"), 100, Some(50)).unwrap();
    let s = store.record_site_seen(&sid("h1"), 200, None).unwrap();
    assert_eq!(
        s,
        SiteRecord {
            id: sid("h1"),
            first_seen_unix_ms: 100,
            last_seen_unix_ms: 200,
            num_examples: Some(50),
            updates_aggregated: 0
        }
    );
    store.record_site_seen(&sid("h0"), 5, None).unwrap();
    let ids: Vec<_> = store.sites().unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![sid("h0"), sid("h1")]);
    assert_eq!(store.replay_state("x").unwrap(), None);
    store.put_replay_state("x", b"abc").unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.replay_state("x").unwrap(), Some(b"abc".to_vec()));
    assert_eq!(store.site("h1").unwrap().unwrap().last_seen_unix_ms, 200);
}

#[test]
fn a_data_directory_opens_once() {
    let dir = tempfile::tempdir().unwrap();
    let _store = Store::open(dir.path()).unwrap();
    assert!(matches!(Store::open(dir.path()), Err(StoreError::Db(_))));
}

/// What the store writes of the round machine's values keeps its bytes now
/// that rounds are typed: a `RoundId` is the plain number in every record
/// (accepted updates in a round's record, a failed job's outcome, the
/// checkpoints), as the `u64` was.
#[test]
fn typed_rounds_are_stored_as_plain_numbers() {
    let u = AcceptedUpdate {
        site: sid("site-a"),
        round: RoundId(3),
        payload_hash: ModelHash([0; 32]),
        num_examples: 5,
        bytes: 7,
        received_unix_ms: 9,
    };
    let zeros = serde_json::to_string(&ModelHash([0; 32])).unwrap();
    assert_eq!(
        encode(&u).unwrap(),
        format!(
            r#"{{"site":"site-a","round":3,"payload_hash":{zeros},"num_examples":5,"bytes":7,"received_unix_ms":9}}"#
        )
    );
    let failed = JobOutcome::Failed {
        round: RoundId(4),
        reason: crate::round::FailReason::Aggregation("x".into()),
    };
    assert_eq!(
        encode(&failed).unwrap(),
        r#"{"Failed":{"round":4,"reason":{"Aggregation":"x"}}}"#
    );
    let started = Checkpoint::RoundStarted {
        round: RoundId(2),
        attempt: 1,
        base_model: ModelHash([0; 32]),
        selected: vec![sid("site-a")],
    };
    assert_eq!(
        encode(&started).unwrap(),
        format!(
            r#"{{"RoundStarted":{{"round":2,"attempt":1,"base_model":{zeros},"selected":["site-a"]}}}}"#
        )
    );
    let back: AcceptedUpdate = decode("rounds", &"t", &encode(&u).unwrap()).unwrap();
    assert_eq!(back, u);
}
