//! The admin API end to end: the real `fedlink` binary against a real
//! coordinator on loopback (QUIC, mTLS with the admin kit), with scripted
//! sites driving rounds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fedlink_certs::{ALPN_ADMIN, ALPN_SITE, Role, SiteManifest, Validity};
use fedlink_cli::admin::export::expected_tensors;
use fedlink_coordinator::job::InitSource;
use fedlink_protocol::FlatModel;
use fedlink_protocol::message::UploadResult;
use fedlink_test_util::TestPki;
use fedlink_tests::bounded;
use fedlink_tests::fixture::{
    JobSpec, RunningCoordinator, TEST_MIN_FREE_DISK_MIB, wait_for_status, workspace_binary,
    write_job, write_job_file,
};
use fedlink_tests::raw_site::{RawSite, join_round};
use serde_json::Value;

/// How long a wait for the coordinator's progress (a round, a job) may take
/// before the test is called hung. Only a safety net: what is waited for
/// always comes; a tight bound would fail on a loaded machine.
const HANG_GUARD: Duration = Duration::from_secs(120);

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

/// Run `fedlink ARGS --kit ADMIN --coordinator ADDR`.
async fn fedlink(kit: &Path, addr: SocketAddr, args: &[&str]) -> Out {
    fedlink_env(kit, addr, args, &[]).await
}

/// [`fedlink`] with the CLI's connection diagnostics on stderr (shown
/// when the command fails, or hangs and is killed).
async fn fedlink_traced(kit: &Path, addr: SocketAddr, args: &[&str]) -> Out {
    let log = ("FEDLINK_LOG", "fedlink_cli=debug,fedlink_transport=debug");
    fedlink_env(kit, addr, args, &[log]).await
}

async fn fedlink_env(kit: &Path, addr: SocketAddr, args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut cmd = tokio::process::Command::new(workspace_binary("fedlink").unwrap());
    cmd.envs(env.iter().copied())
        .args(args)
        .arg("--kit")
        .arg(kit)
        .arg("--coordinator")
        .arg(addr.to_string());
    let out = fedlink_tests::run_bounded(&mut cmd, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("fedlink {args:?}: {e:#}"));
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn ok(kit: &Path, addr: SocketAddr, args: &[&str]) -> Value {
    let out = fedlink(kit, addr, args).await;
    assert_eq!(
        out.code, 0,
        "fedlink {args:?}: {}\n{}",
        out.stdout, out.stderr
    );
    out.json()
}

/// A public CA directory for the coordinator (ca.pem, sites.toml,
/// revoked.toml copied from the CA), so the CA's own tools (renew) do not
/// change what the coordinator reads.
fn public_ca(pki: &TestPki, dir: &Path, drop_sites: &[&str]) -> PathBuf {
    let src = pki.manifest_path().parent().unwrap().to_owned();
    let dst = dir.join("public-ca");
    std::fs::create_dir_all(&dst).unwrap();
    for f in [fedlink_certs::CA_CERT_FILE, fedlink_certs::REVOKED_FILE] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut m = SiteManifest::load(&pki.manifest_path()).unwrap();
    for s in drop_sites {
        m.remove(s);
    }
    m.save(&dst.join(fedlink_certs::SITES_FILE)).unwrap();
    dst
}

async fn start(pki: &TestPki, dir: &Path, ca_dir: &Path, spec: &JobSpec) -> RunningCoordinator {
    let job = write_job(dir, spec).unwrap();
    let path = dir.join("coordinator.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\nkit = {:?}\nca_dir = {:?}\ndata_dir = {:?}\njob = {:?}\nheartbeat_interval_secs = 1\nidle_timeout_secs = 10\nmin_free_disk_mib = {TEST_MIN_FREE_DISK_MIB}\n",
            pki.coordinator_dir(),
            ca_dir,
            dir.join("data"),
            job
        ),
    )
    .unwrap();
    RunningCoordinator::start(&path, false).await.unwrap()
}

/// `coordinator.toml` without a job.
fn empty_config(pki: &TestPki, dir: &Path, ca_dir: &Path) -> PathBuf {
    let path = dir.join("coordinator.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\nkit = {:?}\nca_dir = {:?}\ndata_dir = {:?}\nheartbeat_interval_secs = 1\nidle_timeout_secs = 10\nmin_free_disk_mib = {TEST_MIN_FREE_DISK_MIB}\n",
            pki.coordinator_dir(),
            ca_dir,
            dir.join("data"),
        ),
    )
    .unwrap();
    path
}

fn audit_entries(data_dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(data_dir.join("audit/audit.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The first entry of the coordinator's audit log that matches `f`, read
/// once: no polling, no deadline. Only for entries that are on disk by the
/// time the test looks — every admin-driven event is recorded before the
/// command is answered, a refusal before the connection is closed, and a
/// coordinator that has shut down has recorded every connection's end.
fn audit_entry(data_dir: &Path, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    audit_entries(data_dir)
        .into_iter()
        .find(|e| f(e))
        .unwrap_or_else(|| panic!("no audit entry: {what}"))
}

fn delta(global: &FlatModel) -> FlatModel {
    let values = (0..global.values().len())
        .map(|j| ((j % 5) as f32 - 2.0) * 0.01)
        .collect();
    FlatModel::new(global.spec().clone(), values).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_status_approve_revoke_rotate() {
    let pki = TestPki::new(2).unwrap();
    let new_kit = pki.issue_site("site-new").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = public_ca(&pki, dir.path(), &["site-new"]);
    let spec = JobSpec {
        rounds: 1,
        sites: 3,
        quorum: 3,
        ..JobSpec::default()
    };
    let coord = start(&pki, dir.path(), &ca, &spec).await;
    let admin = pki.admin_dir().to_owned();
    let addr = coord.addr;

    let status = ok(&admin, addr, &["status", "--json"]).await;
    assert_eq!(status["federation"], pki.federation());
    assert_eq!(status["current_job"]["job"], "e2e");
    assert_eq!(status["current_job"]["phase"], "waiting");
    let text = fedlink(&admin, addr, &["status"]).await;
    assert_eq!(text.code, 0);
    assert!(text.stdout.contains("site-0"), "{}", text.stdout);

    let list = ok(&admin, addr, &["sites", "list", "--json"]).await;
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"site-0") && names.contains(&"site-1"),
        "{names:?}"
    );
    assert!(!names.contains(&"site-new"));
    let show = ok(&admin, addr, &["sites", "show", "site-1", "--json"]).await;
    assert_eq!(
        show["identity"],
        format!("fedlink://{}/site/site-1", pki.federation())
    );
    let missing = fedlink(&admin, addr, &["sites", "show", "nope", "--json"]).await;
    assert_eq!(missing.code, 3, "{}", missing.stderr);
    assert_eq!(missing.json()["error"]["code"], "not_found");

    // Not registered yet: refused.
    let new_site = fedlink_certs::Kit::load(&new_kit).unwrap();
    assert!(RawSite::connect(new_site, addr).await.is_err());
    let cert = new_kit.join(fedlink_certs::CERT_FILE);
    let key = new_kit.join(fedlink_certs::UPDATE_PUBLIC_KEY_FILE);
    let approved = ok(
        &admin,
        addr,
        &[
            "sites",
            "approve",
            "--cert",
            cert.to_str().unwrap(),
            "--update-key",
            key.to_str().unwrap(),
            "--max-examples",
            "5000",
            "--json",
        ],
    )
    .await;
    assert_eq!(approved["name"], "site-new");
    // The declared size is registered with the site.
    assert_eq!(approved["max_examples"], 5000);
    let manifest = SiteManifest::load(&ca.join(fedlink_certs::SITES_FILE)).unwrap();
    assert_eq!(manifest.get("site-new").unwrap().max_examples, Some(5000));
    let mut s_new = RawSite::connect(fedlink_certs::Kit::load(&new_kit).unwrap(), addr)
        .await
        .unwrap();
    let again = fedlink(
        &admin,
        addr,
        &[
            "sites",
            "approve",
            "--cert",
            cert.to_str().unwrap(),
            "--update-key",
            key.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(again.code, 3, "approving twice: {}", again.stderr);
    let approval = audit_entry(&coord.data_dir, "site.approved", |e| {
        e["event"] == "site.approved" && e["details"]["site"] == "site-new"
    });
    assert_eq!(approval["details"]["max_examples"], 5000);

    // Revoke a connected site: cut off at once, refused afterwards, and its
    // certificate / update key cannot be approved again.
    let site0 = RawSite::connect(pki.site_kit(0).unwrap(), addr)
        .await
        .unwrap();
    ok(
        &admin,
        addr,
        &[
            "sites",
            "revoke",
            "site-0",
            "--reason",
            "laptop stolen",
            "--json",
        ],
    )
    .await;
    bounded("revoked site cut off", site0.conn.closed())
        .await
        .unwrap();
    assert!(
        RawSite::connect(pki.site_kit(0).unwrap(), addr)
            .await
            .is_err()
    );
    let s0 = pki.site_dir(0).unwrap();
    let reapprove = fedlink(
        &admin,
        addr,
        &[
            "sites",
            "approve",
            "--cert",
            s0.join(fedlink_certs::CERT_FILE).to_str().unwrap(),
            "--update-key",
            s0.join(fedlink_certs::UPDATE_PUBLIC_KEY_FILE)
                .to_str()
                .unwrap(),
        ],
    )
    .await;
    assert_eq!(reapprove.code, 3, "{}", reapprove.stderr);
    let revoked = audit_entry(&coord.data_dir, "site.revoked", |e| {
        e["event"] == "site.revoked"
    });
    assert_eq!(revoked["details"]["reason"], "laptop stolen");
    let names: Vec<String> = ok(&admin, addr, &["sites", "list", "--json"])
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(!names.iter().any(|n| n == "site-0"), "{names:?}");
    assert!(names.iter().any(|n| n == "site-new"), "{names:?}");

    // Rotate: a renewed certificate for site-1 (the CA's own files change,
    // the coordinator's do not); the old connection is cut off, the new
    // certificate connects.
    let site1_old = RawSite::connect(pki.site_kit(1).unwrap(), addr)
        .await
        .unwrap();
    let now = fedlink_certs::time::OffsetDateTime::now_utc();
    let s1 = pki.site_dir(1).unwrap().to_owned();
    pki.ca()
        .renew(
            &s1,
            "site-1",
            Role::Site,
            Validity::days_from(now, 1).unwrap(),
            false,
            now,
        )
        .unwrap();
    assert!(
        RawSite::connect(pki.site_kit(1).unwrap(), addr)
            .await
            .is_err(),
        "a renewed certificate is refused until rotated in"
    );
    let rotated = ok(
        &admin,
        addr,
        &[
            "sites",
            "rotate",
            "site-1",
            "--cert",
            s1.join(fedlink_certs::CERT_FILE).to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    assert!(rotated["renewed_at"].is_string());
    bounded("old certificate cut off", site1_old.conn.closed())
        .await
        .unwrap();
    let _site1 = RawSite::connect(pki.site_kit(1).unwrap(), addr)
        .await
        .unwrap();
    audit_entry(&coord.data_dir, "site.rotated", |e| {
        e["event"] == "site.rotated"
    });

    // The approved site takes part in rounds: with site-1 and site-new
    // connected the job (3 sites) still waits; status shows both.
    let status = ok(&admin, addr, &["status", "--json"]).await;
    let states = status["current_job"]["sites"].as_array().unwrap();
    let connected: Vec<&str> = states
        .iter()
        .filter(|s| s["connected"] == true)
        .map(|s| s["site"].as_str().unwrap())
        .collect();
    assert_eq!(connected, ["site-1", "site-new"]);
    s_new.vanish();
    let _ = &mut s_new;

    // Every command was recorded with the admin as the actor.
    let admin_uri = format!("fedlink://{}/admin/admin", pki.federation());
    let cmds: Vec<String> = audit_entries(&coord.data_dir)
        .into_iter()
        .filter(|e| e["event"] == "admin.command")
        .map(|e| {
            assert_eq!(e["actor"], admin_uri.as_str());
            e["details"]["command"].as_str().unwrap().to_owned()
        })
        .collect();
    for c in [
        "status",
        "sites.list",
        "sites.show",
        "sites.approve",
        "sites.revoke",
        "sites.rotate",
    ] {
        assert!(cmds.iter().any(|x| x == c), "{c} not audited: {cmds:?}");
    }
    coord.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_rounds_models_and_export() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = public_ca(&pki, dir.path(), &[]);
    let spec = JobSpec {
        id: "first".into(),
        rounds: 3,
        sites: 1,
        quorum: 1,
        ..JobSpec::default()
    };
    let coord = start(&pki, dir.path(), &ca, &spec).await;
    let admin = pki.admin_dir().to_owned();
    let addr = coord.addr;
    let mut site = RawSite::connect(pki.site_kit(0).unwrap(), addr)
        .await
        .unwrap();

    // Round 1.
    let offer = site.next_offer().await.unwrap();
    site.accept(&offer).await.unwrap();
    let global = site.fetch_model(&offer).await.unwrap();
    let up = site.prepare(&offer, &delta(&global), 10).unwrap();
    let r = site.upload(&up, None).await.unwrap().unwrap();
    assert!(
        matches!(r, UploadResult::Ack { accepted: true, .. }),
        "{r:?}"
    );
    // Round 2's offer names round 1's model: fetch it (hash-verified).
    let offer2 = site.next_offer().await.unwrap();
    site.accept(&offer2).await.unwrap();
    let model1 = site.fetch_model(&offer2).await.unwrap();
    let hash1 = model1.hash().to_hex();

    // Queue a second job while the first runs.
    let second = write_job(
        dir.path(),
        &JobSpec {
            id: "second".into(),
            rounds: 1,
            sites: 1,
            quorum: 1,
            ..JobSpec::default()
        },
    )
    .unwrap();
    let submitted = ok(
        &admin,
        addr,
        &["jobs", "submit", second.to_str().unwrap(), "--json"],
    )
    .await;
    assert_eq!(submitted["state"], "queued");
    let dup = fedlink(&admin, addr, &["jobs", "submit", second.to_str().unwrap()]).await;
    assert_eq!(dup.code, 3, "{}", dup.stderr);
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "id = \"bad\"\nrounds = 0\n").unwrap();
    let invalid = fedlink(
        &admin,
        addr,
        &["jobs", "submit", bad.to_str().unwrap(), "--json"],
    )
    .await;
    assert_eq!(invalid.code, 3, "{}", invalid.stderr);
    assert_eq!(invalid.json()["error"]["code"], "invalid");
    let status = ok(&admin, addr, &["status", "--json"]).await;
    assert_eq!(status["queued_jobs"], serde_json::json!(["second"]));
    assert_eq!(status["current_job"]["phase"], "collecting");
    assert_eq!(status["current_job"]["round"], 2);
    let site0 = status["current_job"]["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["site"] == "site-0")
        .unwrap()
        .clone();
    assert_eq!(site0["state"], "training");
    assert_eq!(site0["connected"], true);
    let jobs = ok(&admin, addr, &["jobs", "list", "--json"]).await;
    let states: Vec<(String, String)> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["id"].as_str().unwrap().into(),
                j["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("first".into(), "running".into()),
            ("second".into(), "queued".into())
        ]
    );
    let show = ok(&admin, addr, &["jobs", "show", "second", "--json"]).await;
    assert!(show["job_toml"].as_str().unwrap().contains("second"));

    // Rounds.
    let rounds = ok(&admin, addr, &["rounds", "list", "first", "--json"]).await;
    let rounds = rounds["rounds"].as_array().unwrap().clone();
    assert_eq!(rounds.len(), 2);
    assert_eq!(rounds[0]["state"], "Completed");
    assert_eq!(rounds[0]["model"], hash1.as_str());
    let r1 = ok(&admin, addr, &["rounds", "show", "first", "1", "--json"]).await;
    assert_eq!(r1["round"]["round"], 1);
    assert_eq!(r1["round"]["accepted"][0]["site"], "site-0");
    let text = fedlink(&admin, addr, &["rounds", "list", "first"]).await;
    assert!(text.stdout.contains("Completed"), "{}", text.stdout);
    assert_eq!(
        fedlink(&admin, addr, &["rounds", "show", "first", "9"])
            .await
            .code,
        3
    );
    assert_eq!(
        fedlink(&admin, addr, &["rounds", "list", "nope"])
            .await
            .code,
        3
    );

    // Models: list, provenance back to the initial model, export.
    let models = ok(&admin, addr, &["models", "list", "--json"]).await;
    let hashes: Vec<&str> = models
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["hash"].as_str().unwrap())
        .collect();
    assert!(hashes.contains(&hash1.as_str()), "{hashes:?}");
    assert!(hashes.contains(&global.hash().to_hex().as_str()));
    let prov = ok(
        &admin,
        addr,
        &["models", "show", &hash1, "--provenance", "--json"],
    )
    .await;
    assert_eq!(prov["model"]["round"], 1);
    let steps = prov["provenance"].as_array().unwrap();
    assert_eq!(steps.len(), 1);
    assert_eq!(steps[0]["base_model"], global.hash().to_hex().as_str());
    assert_eq!(steps[0]["output_model"], hash1.as_str());
    assert!(steps[0]["strategy"].is_object(), "{}", steps[0]["strategy"]);
    let u = &steps[0]["updates"][0];
    assert_eq!(u["site"], "site-0");
    assert_eq!(
        u["payload_hash"],
        up.envelope.header.payload_hash.to_hex().as_str()
    );
    assert_eq!(
        u["envelope_sig"],
        hex_of(&up.envelope.signature.to_bytes()).as_str(),
        "the archived envelope's signature"
    );
    assert_eq!(
        fedlink(&admin, addr, &["models", "show", &"0".repeat(64)])
            .await
            .code,
        3
    );

    let out = dir.path().join("model1.safetensors");
    let exported = ok(
        &admin,
        addr,
        &[
            "models",
            "export",
            &hash1,
            "--format",
            "safetensors",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
    )
    .await;
    assert_eq!(exported["model"], hash1.as_str());
    check_safetensors(&out, &model1, &hash1);
    // Never overwrites.
    let again = fedlink(
        &admin,
        addr,
        &["models", "export", &hash1, "--out", out.to_str().unwrap()],
    )
    .await;
    assert_eq!(again.code, 1, "{}", again.stderr);
    audit_entry(&coord.data_dir, "model.exported", |e| {
        e["event"] == "model.exported" && e["details"]["model"] == hash1.as_str()
    });

    // Pause, resume, abort the running job; the queued job then starts.
    let paused = ok(&admin, addr, &["jobs", "pause", "first", "--json"]).await;
    assert_eq!(paused["state"], "paused");
    assert_eq!(paused["paused"], true);
    let resumed = ok(&admin, addr, &["jobs", "resume", "first", "--json"]).await;
    assert_eq!(resumed["state"], "running");
    let aborted = ok(&admin, addr, &["jobs", "abort", "first", "--json"]).await;
    assert_eq!(aborted["state"], "finished");
    assert!(
        aborted["outcome"].as_str().unwrap().starts_with("aborted"),
        "{aborted}"
    );
    assert_eq!(
        fedlink(&admin, addr, &["jobs", "pause", "first"])
            .await
            .code,
        3
    );
    for ev in ["job.paused", "job.resumed", "job.aborted"] {
        audit_entry(&coord.data_dir, ev, |e| {
            e["event"] == ev && e["details"]["job"] == "first"
        });
    }
    assert_eq!(
        fedlink(&admin, addr, &["jobs", "pause", "nope"]).await.code,
        3
    );
    wait_for_status(&coord.data_dir, "second job running", HANG_GUARD, |s| {
        s.job == "second"
    })
    .await
    .unwrap();
    let status = ok(&admin, addr, &["status", "--json"]).await;
    assert_eq!(status["current_job"]["job"], "second");
    assert_eq!(status["queued_jobs"], serde_json::json!([]));
    // The site's connection was handed to the new job; a new connection of
    // the site replaces it and completes the new job's single round.
    let mut site = RawSite::connect(pki.site_kit(0).unwrap(), addr)
        .await
        .unwrap();
    let offer = site.next_offer().await.unwrap();
    assert_eq!(offer.job_id.as_str(), "second");
    site.accept(&offer).await.unwrap();
    let g = site.fetch_model(&offer).await.unwrap();
    let up = site.prepare(&offer, &delta(&g), 5).unwrap();
    assert!(matches!(
        site.upload(&up, None).await.unwrap().unwrap(),
        UploadResult::Ack { .. }
    ));
    wait_for_status(&coord.data_dir, "second job done", HANG_GUARD, |s| {
        s.completed
    })
    .await
    .unwrap();
    let jobs = ok(&admin, addr, &["jobs", "list", "--json"]).await;
    assert!(
        jobs.as_array()
            .unwrap()
            .iter()
            .all(|j| j["state"] == "finished"),
        "{jobs}"
    );
    coord.shutdown().await.unwrap();
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn check_safetensors(path: &Path, model: &FlatModel, hash: &str) {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let m = meta.metadata().as_ref().unwrap();
    assert_eq!(m["fedlink_model"], hash);
    assert_eq!(m["fedlink_job"], "first");
    assert_eq!(m["fedlink_round"], "1");
    let arch: Value = serde_json::from_str(&m["fedlink_arch"]).unwrap();
    assert_eq!(arch["kind"], "logreg");
    assert!(m["format"].contains("transposed"));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let expected = expected_tensors(model);
    assert_eq!(st.len(), expected.len());
    for (name, shape, values) in expected {
        let t = st.tensor(&name).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        assert_eq!(t.shape(), shape.as_slice(), "{name}");
        let got: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(got, values, "{name}");
    }
    // logreg: burn stores linear.weight as [inputs, classes]; PyTorch wants
    // [classes, inputs], element [c][i] = burn [i][c].
    let stored = model.tensor_by_path("linear.weight").unwrap();
    let t = st.tensor("linear.weight").unwrap();
    assert_eq!(t.shape(), [2, 4]);
    let d = t.data();
    let at = |c: usize, i: usize| {
        let k = (c * 4 + i) * 4;
        f32::from_le_bytes([d[k], d[k + 1], d[k + 2], d[k + 3]])
    };
    for i in 0..4 {
        for c in 0..2 {
            assert_eq!(at(c, i), stored[i * 2 + c]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_certificate_refused_on_admin_api_and_unreachable_coordinator() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = public_ca(&pki, dir.path(), &[]);
    let coord = start(
        &pki,
        dir.path(),
        &ca,
        &JobSpec {
            rounds: 1,
            sites: 1,
            quorum: 1,
            ..JobSpec::default()
        },
    )
    .await;
    let addr = coord.addr;

    // A site certificate speaking the admin protocol.
    let kit = pki.site_kit(0).unwrap();
    let mut tls = fedlink_certs::client_tls_config(&kit, ALPN_SITE).unwrap();
    tls.alpn_protocols = vec![ALPN_ADMIN.to_vec()];
    let endpoint = fedlink_transport::client_endpoint(addr, tls, Duration::from_secs(10)).unwrap();
    let refused = async {
        let conn = endpoint
            .connect(addr, kit.coordinator_server_name())?
            .await?;
        let (mut send, mut recv) = fedlink_transport::open_bi(&conn).await?;
        send.chunk(fedlink_protocol::admin::AdminRequest::SitesList.to_json()?)
            .await?;
        send.finish()?;
        let answer = recv.chunk().await?;
        anyhow::Ok(answer)
    };
    let r = bounded("site on the admin API", refused).await.unwrap();
    assert!(r.is_err(), "a site certificate got an admin answer: {r:?}");
    let entry = audit_entry(&coord.data_dir, "conn.refused for the admin ALPN", |e| {
        e["event"] == "conn.refused" && e["details"]["alpn"] == "fedlink-admin/1"
    });
    assert_eq!(
        entry["details"]["identity"],
        format!("fedlink://{}/site/site-0", pki.federation())
    );
    assert!(
        !audit_entries(&coord.data_dir)
            .iter()
            .any(|e| e["event"] == "admin.command"),
        "no admin command may run for a site"
    );
    // The admin still gets in.
    ok(pki.admin_dir(), addr, &["status", "--json"]).await;
    coord.shutdown().await.unwrap();

    // Nothing listens there any more: exit 4.
    let t = Instant::now();
    let out = fedlink(pki.admin_dir(), addr, &["status", "--json"]).await;
    assert_eq!(out.code, 4, "{}", out.stderr);
    assert!(t.elapsed() < Duration::from_secs(30));
    // Usage errors: exit 2.
    let out = fedlink(pki.admin_dir(), addr, &["jobs", "frobnicate"]).await;
    assert_eq!(out.code, 2, "{}", out.stderr);
}

/// A job switch hands the connected sites to the next queued job the way
/// an empty start hands them to the first: no Bye, no reconnect — the
/// next job's offer comes on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_switch_hands_connected_sites_to_the_next_job() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = public_ca(&pki, dir.path(), &[]);
    let config = empty_config(&pki, dir.path(), &ca);
    let coord = RunningCoordinator::start(&config, false).await.unwrap();
    let admin = pki.admin_dir().to_owned();
    let addr = coord.addr;

    let mut site = RawSite::connect(pki.site_kit(0).unwrap(), addr)
        .await
        .unwrap();
    let submit = |id: &str| {
        let path = write_job(
            dir.path(),
            &JobSpec {
                id: id.into(),
                rounds: 1,
                sites: 1,
                quorum: 1,
                ..JobSpec::default()
            },
        )
        .unwrap();
        let admin = admin.clone();
        async move {
            ok(
                &admin,
                addr,
                &["jobs", "submit", path.to_str().unwrap(), "--json"],
            )
            .await
        }
    };
    assert_eq!(submit("one").await["id"], "one");
    let offer = site.next_offer().await.unwrap();
    assert_eq!(offer.job_id.as_str(), "one");
    // Queued behind the running job.
    assert_eq!(submit("two").await["state"], "queued");
    site.accept(&offer).await.unwrap();
    let global = site.fetch_model(&offer).await.unwrap();
    let up = site.prepare(&offer, &delta(&global), 7).unwrap();
    let r = site.upload(&up, None).await.unwrap().unwrap();
    assert!(
        matches!(r, UploadResult::Ack { accepted: true, .. }),
        "{r:?}"
    );

    // The same connection gets the next job's offer: `next_offer` fails
    // on a Bye, and the site never reconnects.
    let offer2 = site.next_offer().await.unwrap();
    assert_eq!(offer2.job_id.as_str(), "two");
    // The end of the first job reached the site before the switch.
    assert!(
        site.round_outcomes
            .iter()
            .any(|o| o.job_id.as_str() == "one" && o.job_completed),
        "{:?}",
        site.round_outcomes
    );
    site.accept(&offer2).await.unwrap();
    let global2 = site.fetch_model(&offer2).await.unwrap();
    let up2 = site.prepare(&offer2, &delta(&global2), 7).unwrap();
    let r2 = site.upload(&up2, None).await.unwrap().unwrap();
    assert!(
        matches!(r2, UploadResult::Ack { accepted: true, .. }),
        "{r2:?}"
    );
    let done = wait_for_status(&coord.data_dir, "second job done", HANG_GUARD, |s| {
        s.job == "two" && s.completed
    })
    .await
    .unwrap();
    assert_eq!(done.connected_sites, vec!["site-0".to_owned()]);
    coord.shutdown().await.unwrap();
}

/// A coordinator with no job starts empty: sites connect and wait, `status`
/// says no job runs, and the first submitted job starts at once with the
/// sites already connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_empty_and_runs_the_first_submitted_job() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = public_ca(&pki, dir.path(), &[]);
    let config = empty_config(&pki, dir.path(), &ca);
    let coord = RunningCoordinator::start(&config, false).await.unwrap();
    let admin = pki.admin_dir().to_owned();
    let addr = coord.addr;

    let mut site = RawSite::connect(pki.site_kit(0).unwrap(), addr)
        .await
        .unwrap();
    // The site is held (connected, idle) while no job runs. The coordinator
    // registers a site before it sends Welcome, so a welcomed site is
    // always shown: one look, no polling.
    let status = ok(&admin, addr, &["status", "--json"]).await;
    assert_eq!(
        status["connected_sites"],
        serde_json::json!(["site-0"]),
        "{status}"
    );
    assert!(status["current_job"].is_null(), "{status}");
    assert_eq!(status["queued_jobs"], serde_json::json!([]));
    let text = fedlink(&admin, addr, &["status"]).await;
    assert_eq!(text.code, 0, "{}", text.stderr);
    assert!(text.stdout.contains("none running"), "{}", text.stdout);
    let sites = ok(&admin, addr, &["sites", "show", "site-0", "--json"]).await;
    assert_eq!(sites["connected"], true, "{sites}");
    // Nothing to download or upload yet: no model is published.
    assert_eq!(
        ok(&admin, addr, &["jobs", "list", "--json"]).await,
        serde_json::json!([])
    );

    let job = write_job(
        dir.path(),
        &JobSpec {
            id: "late".into(),
            rounds: 1,
            sites: 1,
            quorum: 1,
            ..JobSpec::default()
        },
    )
    .unwrap();
    let submitted = ok(
        &admin,
        addr,
        &["jobs", "submit", job.to_str().unwrap(), "--json"],
    )
    .await;
    assert_eq!(submitted["id"], "late");

    // The held connection is handed to the job: the offer comes on it.
    let offer = site.next_offer().await.unwrap();
    assert_eq!(offer.job_id.as_str(), "late");
    site.accept(&offer).await.unwrap();
    let global = site.fetch_model(&offer).await.unwrap();
    let up = site.prepare(&offer, &delta(&global), 7).unwrap();
    let r = site.upload(&up, None).await.unwrap().unwrap();
    assert!(
        matches!(r, UploadResult::Ack { accepted: true, .. }),
        "{r:?}"
    );
    let done = wait_for_status(&coord.data_dir, "submitted job done", HANG_GUARD, |s| {
        s.completed
    })
    .await
    .unwrap();
    assert_eq!(done.job, "late");
    let status = ok(&admin, addr, &["status", "--json"]).await;
    assert_eq!(status["current_job"]["job"], "late");
    audit_entry(&coord.data_dir, "job.submitted", |e| {
        e["event"] == "job.submitted" && e["details"]["job"] == "late"
    });
    coord.shutdown().await.unwrap();

    // --exit-after-job with no job at all: a clear refusal, not a wait.
    let dir2 = tempfile::tempdir().unwrap();
    let ca2 = public_ca(&pki, dir2.path(), &[]);
    let cfg = fedlink_coordinator::config::CoordinatorConfig::load(&empty_config(
        &pki,
        dir2.path(),
        &ca2,
    ))
    .unwrap();
    let refused = bounded(
        "serve without a job",
        fedlink_coordinator::server::serve(
            cfg,
            fedlink_coordinator::server::ServeOptions {
                exit_after_job: true,
                bound: None,
            },
            std::future::pending::<()>(),
        ),
    )
    .await
    .unwrap();
    let err = refused.expect_err("--exit-after-job without a job must not run");
    assert!(err.to_string().contains("no job to run"), "{err}");
}

/// Admin connections are audited like site connections (`conn.accepted`
/// with the admin's identity and ALPN, `conn.closed`), and an open admin
/// connection is cut as soon as its certificate is revoked, without
/// waiting for its next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_audited_and_cut_on_revocation() {
    use fedlink_cli::admin::client::AdminClient;
    use fedlink_protocol::admin::{AdminRequest, AdminResponse};

    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = public_ca(&pki, dir.path(), &[]);
    let config = empty_config(&pki, dir.path(), &ca);
    let coord = RunningCoordinator::start(&config, false).await.unwrap();
    let coord_data_dir = coord.data_dir.clone();
    let admin = pki.admin_dir().to_owned();
    let addr = coord.addr;
    let admin_uri = format!("fedlink://{}/admin/admin", pki.federation());

    // A short-lived admin connection: one command (over QUIC, and over
    // TLS on TCP for an operator whose network blocks UDP).
    ok(&admin, addr, &["status", "--json"]).await;
    ok(&admin, addr, &["status", "--json", "--transport", "tcp"]).await;

    // A long-lived admin connection, idle after one command.
    let client = AdminClient::connect(
        &admin,
        Some(&addr.to_string()),
        fedlink_transport::TransportKind::Quic,
    )
    .await
    .unwrap();
    let status = client.request(&AdminRequest::Status).await.unwrap();
    assert!(matches!(status, AdminResponse::Status(_)), "{status:?}");
    // Revoke the admin certificate at the CA and publish the list to the
    // coordinator's CA directory (atomically, as an operator's copy would).
    let now = fedlink_certs::time::OffsetDateTime::now_utc();
    pki.ca()
        .revoke("admin", Some(Role::Admin), Some("key lost"), now)
        .unwrap();
    let src = pki
        .manifest_path()
        .parent()
        .unwrap()
        .join(fedlink_certs::REVOKED_FILE);
    let tmp = ca.join("revoked.toml.tmp");
    std::fs::copy(&src, &tmp).unwrap();
    std::fs::rename(&tmp, ca.join(fedlink_certs::REVOKED_FILE)).unwrap();
    // Cut without sending anything.
    let reason = bounded("revoked admin connection cut", client.closed())
        .await
        .unwrap();
    assert!(reason.to_string().contains("revoked"), "{reason}");
    // New connections with the revoked certificate are refused: the
    // coordinator cannot be reached with it (exit code 4), over either
    // transport.
    for transport in ["quic", "tcp"] {
        let refused = fedlink_traced(&admin, addr, &["status", "--transport", transport]).await;
        assert_eq!(
            refused.code,
            i32::from(fedlink_cli::admin::client::EXIT_UNREACHABLE),
            "{transport}: {}{}",
            refused.stdout,
            refused.stderr
        );
    }

    // A coordinator that has shut down has recorded the end of every
    // connection: the audit log is read once, with no waiting.
    coord.shutdown().await.unwrap();
    let data_dir = &coord_data_dir;
    let seq = |e: &Value| e["seq"].as_u64().unwrap();
    let of_admin = |event: &'static str| {
        let admin_uri = admin_uri.clone();
        move |e: &Value| e["event"] == event && e["actor"] == admin_uri.as_str()
    };
    let accepted = audit_entry(data_dir, "admin conn.accepted", of_admin("conn.accepted"));
    assert_eq!(accepted["details"]["identity"], admin_uri.as_str());
    assert_eq!(accepted["details"]["alpn"], "fedlink-admin/1");
    assert!(accepted["details"]["cert_serial"].is_string(), "{accepted}");
    assert!(accepted["details"]["peer_addr"].is_string(), "{accepted}");
    let closed = audit_entry(data_dir, "admin conn.closed", of_admin("conn.closed"));
    assert_eq!(closed["details"]["identity"], admin_uri.as_str());
    // Accepted before the command, closed after it.
    let command = audit_entry(data_dir, "admin.command", |e| e["event"] == "admin.command");
    assert!(seq(&accepted) < seq(&command) && seq(&command) < seq(&closed));
    // The long-lived connection's end carries the reason it was cut for.
    let cut = audit_entry(data_dir, "conn.closed of the revoked admin", |e| {
        of_admin("conn.closed")(e)
            && e["details"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("revoked"))
    });
    assert!(seq(&cut) > seq(&closed));
}

/// A distinct delta per site, so that leaving one out changes the average.
fn site_delta(global: &FlatModel, site: usize) -> FlatModel {
    let values = (0..global.values().len())
        .map(|j| ((j % 5) as f32 - 2.0) * 0.01 * (site as f32 + 1.0))
        .collect();
    FlatModel::new(global.spec().clone(), values).unwrap()
}

/// Issue 15 (2): a site revoked after its update was accepted, before the
/// round aggregates, does not count. Its update is taken out of the round
/// (`update.excluded` in the audit log), the new model is the weighted
/// average of the others, and the round's replay record does not list it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_whose_site_was_revoked_before_aggregation_is_left_out() {
    let pki = TestPki::new(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = public_ca(&pki, dir.path(), &[]);
    let spec = JobSpec {
        rounds: 1,
        sites: 3,
        quorum: 2,
        deadline_secs: 120,
        ..JobSpec::default()
    };
    let coord = start(&pki, dir.path(), &ca, &spec).await;
    let addr = coord.addr;
    let admin = pki.admin_dir().to_owned();
    let mut sites = Vec::new();
    for i in 0..3 {
        sites.push(
            RawSite::connect(pki.site_kit(i).unwrap(), addr)
                .await
                .unwrap(),
        );
    }
    let (offers, global) = join_round(&mut sites).await.unwrap();
    let examples = |i: usize| 10 * (i as u64 + 1);
    let upload = async |i: usize| {
        let up = sites[i]
            .prepare(&offers[i], &site_delta(&global, i), examples(i))
            .unwrap();
        sites[i].upload(&up, None).await.unwrap().unwrap()
    };
    for i in [0, 1] {
        let r = upload(i).await;
        assert!(
            matches!(r, UploadResult::Ack { accepted: true, .. }),
            "site {i}: {r:?}"
        );
    }
    // Site 0's update is accepted and folded; now its site is revoked.
    ok(
        &admin,
        addr,
        &[
            "sites",
            "revoke",
            "site-0",
            "--reason",
            "compromised",
            "--json",
        ],
    )
    .await;
    let r = upload(2).await;
    assert!(
        matches!(r, UploadResult::Ack { accepted: true, .. }),
        "site 2: {r:?}"
    );
    let status = wait_for_status(
        &coord.data_dir,
        "the round to aggregate",
        Duration::from_secs(60),
        |s| s.completed,
    )
    .await
    .unwrap();
    let model = status.rounds[0].model.clone().expect("the round's model");
    let hash = fedlink_protocol::ModelHash::from_hex(&model).unwrap();
    let next = fedlink_coordinator::store::read_model_file(
        &coord.data_dir.join(format!("models/{model}.bin")),
        &hash,
    )
    .unwrap();
    // The weighted average of sites 1 and 2 only.
    let total: u64 = [1, 2].iter().map(|&i| examples(i)).sum();
    for (j, (&got, &base)) in next.values().iter().zip(global.values()).enumerate() {
        let acc: f64 = [1usize, 2]
            .iter()
            .map(|&i| examples(i) as f64 * f64::from(site_delta(&global, i).values()[j]))
            .sum();
        let want = base + (acc / total as f64) as f32;
        assert!((got - want).abs() <= 1e-6, "value {j}: {got} vs {want}");
    }
    let excluded = audit_entry(&coord.data_dir, "update.excluded", |e| {
        e["event"] == "update.excluded"
    });
    assert_eq!(excluded["details"]["site"], "site-0");
    assert!(
        excluded["details"]["reason"]
            .as_str()
            .unwrap()
            .contains("no longer allowed"),
        "{excluded}"
    );
    let aggregated = audit_entry(&coord.data_dir, "round.aggregated", |e| {
        e["event"] == "round.aggregated"
    });
    let inputs: Vec<&str> = aggregated["details"]["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["site"].as_str().unwrap())
        .collect();
    assert_eq!(inputs, ["site-1", "site-2"]);
    assert!(
        audit_entries(&coord.data_dir)
            .iter()
            .position(|e| e["event"] == "update.excluded")
            < audit_entries(&coord.data_dir)
                .iter()
                .position(|e| e["event"] == "round.aggregated"),
        "excluded before aggregated"
    );
    coord.shutdown().await.unwrap();
}

/// `jobs submit` reads an `init = { file = … }` only from the configured
/// `init_dir`, and only a regular file no larger than the architecture
/// needs; everything else is refused before the file is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_initial_models_are_read_only_from_init_dir() {
    let pki = TestPki::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = public_ca(&pki, dir.path(), &[]);
    let config = empty_config(&pki, dir.path(), &ca);
    let init = dir.path().join("init");
    std::fs::create_dir(&init).unwrap();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("init_dir = \"init\"\n");
    std::fs::write(&config, text).unwrap();

    // A valid initial model (the JobSpec's logreg, 4 inputs), inside and
    // outside init_dir.
    let arch = fedlink_protocol::arch::ArchSpec::LogReg {
        inputs: 4,
        classes: 2,
    };
    let model = arch.init(5).unwrap();
    let bytes =
        fedlink_aggregation::safetensors_io::serialize(&model, &Default::default()).unwrap();
    std::fs::write(init.join("good.safetensors"), &bytes).unwrap();
    let outside = dir.path().join("outside.safetensors");
    std::fs::write(&outside, &bytes).unwrap();
    std::os::unix::fs::symlink(&outside, init.join("link.safetensors")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", init.join("zero")).unwrap();
    std::fs::create_dir(init.join("sub")).unwrap();
    // Larger than 4 bytes × 10 parameters + the header room: not read.
    let big = std::fs::File::create(init.join("big.safetensors")).unwrap();
    big.set_len(2 << 20).unwrap();
    drop(big);

    let coord = RunningCoordinator::start(&config, false).await.unwrap();
    let admin = pki.admin_dir().to_owned();
    let addr = coord.addr;
    let submit = |id: &str, file: &str| {
        let mut job = JobSpec {
            id: id.into(),
            ..JobSpec::default()
        }
        .job();
        job.init = InitSource::File(file.into());
        let path = write_job_file(dir.path(), &job).unwrap();
        let admin = admin.clone();
        async move { fedlink(&admin, addr, &["jobs", "submit", path.to_str().unwrap()]).await }
    };
    let outside_abs = outside.to_str().unwrap().to_owned();
    for (id, file, code, why) in [
        (
            "up",
            "../outside.safetensors",
            "refused",
            "outside init_dir",
        ),
        ("abs", outside_abs.as_str(), "refused", "outside init_dir"),
        ("link", "link.safetensors", "refused", "outside init_dir"),
        ("devzero", "/dev/zero", "refused", "outside init_dir"),
        ("zero", "zero", "refused", "outside init_dir"),
        ("missing", "none.safetensors", "refused", "No such file"),
        ("sub", "sub", "invalid", "not a regular file"),
        ("big", "big.safetensors", "invalid", "more than the"),
    ] {
        let out = submit(id, file).await;
        assert_eq!(out.code, 3, "{id}: {}{}", out.stdout, out.stderr);
        assert!(
            out.stderr.to_lowercase().contains(code),
            "{id}: {}",
            out.stderr
        );
        assert!(out.stderr.contains(why), "{id}: {}", out.stderr);
    }
    // Inside init_dir: accepted, and the stored initial model is the file's.
    let out = submit("good", "good.safetensors").await;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    let shown = ok(&admin, addr, &["jobs", "show", "good", "--json"]).await;
    assert_eq!(shown["initial_model"], model.hash().to_hex(), "{shown}");
    let listed = ok(&admin, addr, &["jobs", "list", "--json"]).await;
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    drop(coord);
}
