//! Output of admin answers: JSON (the answer's `data`, stable field names)
//! or readable tables.

use std::fmt::Write;

use fedlink_protocol::admin::{AdminResponse, FederatedEvaluation, JobInfo, SiteInfo};

/// The answer's data as pretty JSON.
pub(super) fn json(resp: &AdminResponse) -> serde_json::Result<String> {
    let v = serde_json::to_value(resp)?;
    serde_json::to_string_pretty(v.get("data").unwrap_or(&v))
}

fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            let _ = write!(s, "{c:<w$}  ");
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn short(hex: &str) -> String {
    hex.chars().take(16).collect()
}

/// Ids, comma-separated.
fn comma_list<T: std::fmt::Display>(ids: &[T]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// `no`, `yes`, or how: `quic 3.1 ms`, `tcp+proxy 41.0 ms`.
fn connected_cell(s: &SiteInfo) -> String {
    match (&s.link, s.connected) {
        (Some(l), _) => format!("{} {:.1} ms", l.route(), l.rtt_ms),
        (None, true) => "yes".into(),
        (None, false) => "no".into(),
    }
}

fn site_rows(sites: &[SiteInfo]) -> String {
    table(
        &[
            "SITE",
            "CONNECTED",
            "CERT SERIAL",
            "UPDATE KEY",
            "ADDED",
            "RENEWED",
            "UPDATES",
        ],
        &sites
            .iter()
            .map(|s| {
                vec![
                    s.name.to_string(),
                    connected_cell(s),
                    short(&s.cert_serial),
                    short(&s.update_public_key),
                    s.added_at.clone(),
                    opt(s.renewed_at.clone()),
                    opt(s.updates_aggregated),
                ]
            })
            .collect::<Vec<_>>(),
    )
}

fn job_rows(jobs: &[JobInfo]) -> String {
    table(
        &["JOB", "STATE", "ROUNDS", "CURRENT MODEL", "OUTCOME"],
        &jobs
            .iter()
            .map(|j| {
                vec![
                    j.id.to_string(),
                    j.state.clone(),
                    format!("{}/{}", j.completed_rounds, j.total_rounds),
                    short(&j.current_model.to_hex()),
                    opt(j.outcome.clone()),
                ]
            })
            .collect::<Vec<_>>(),
    )
}

fn field(v: &serde_json::Value, k: &str) -> String {
    match v.get(k) {
        None | Some(serde_json::Value::Null) => "-".into(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Array(a)) => a.len().to_string(),
        Some(other) => other.to_string(),
    }
}

fn list(v: &serde_json::Value, k: &str) -> Vec<serde_json::Value> {
    v.get(k)
        .and_then(serde_json::Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn duration_ms(r: &serde_json::Value) -> String {
    match (
        r.get("opened_unix_ms").and_then(serde_json::Value::as_u64),
        r.get("closed_unix_ms").and_then(serde_json::Value::as_u64),
    ) {
        (Some(a), Some(b)) if b >= a => format!("{} ms", b - a),
        _ => "-".into(),
    }
}

fn metric(v: &serde_json::Value, k: &str) -> String {
    v.get("metrics")
        .and_then(|m| m.get(k))
        .and_then(serde_json::Value::as_f64)
        .map_or_else(|| "-".into(), |x| format!("{x:.4}"))
}

fn num(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.4}"))
}

/// The evaluation in `r[key]` (a round record's `evaluation` or
/// `final_evaluation`), if any; `label` names it when it cannot be read.
fn evaluation_field(out: &mut String, r: &serde_json::Value, key: &str, label: &str) {
    match r
        .get(key)
        .filter(|v| !v.is_null())
        .map(|v| serde_json::from_value::<FederatedEvaluation>(v.clone()))
    {
        Some(Ok(e)) => {
            out.push('\n');
            evaluation_text(out, &e);
        }
        Some(Err(e)) => {
            let _ = writeln!(out, "\n{label}: unreadable ({e})");
        }
        None => {}
    }
}

/// A federated evaluation: one row per site, then the example-weighted
/// mean, then the reports left out.
fn evaluation_text(out: &mut String, e: &FederatedEvaluation) {
    let made_by = if e.after_round == 0 {
        "the initial model".to_owned()
    } else {
        format!("after round {}", e.after_round)
    };
    let how = match e.reported_in_round {
        Some(r) => format!("reported in round {r}"),
        None => "asked for by the coordinator".to_owned(),
    };
    let _ = writeln!(
        out,
        "federated evaluation of model {} ({made_by}; {how}, each site on its validation split)",
        short(&e.model),
    );
    let mut rows: Vec<Vec<String>> = e
        .sites
        .iter()
        .map(|s| {
            vec![
                s.site.clone(),
                s.num_eval_examples.to_string(),
                num(s.loss),
                num(s.accuracy),
                num(s.auc),
                num(s.dice),
            ]
        })
        .collect();
    let w = &e.weighted;
    rows.push(vec![
        format!("weighted ({} sites)", w.sites),
        w.num_eval_examples.to_string(),
        num(w.loss),
        num(w.accuracy),
        num(w.auc),
        num(w.dice),
    ]);
    out.push_str(&table(
        &["SITE", "EXAMPLES", "LOSS", "ACCURACY", "AUC", "DICE"],
        &rows,
    ));
    for x in &e.excluded {
        let _ = writeln!(out, "left out: {} ({})", x.site, x.reason);
    }
}

/// `rounds show`: the round, then one row per update (accepted, rejected,
/// discarded) and per declined offer, with what the coordinator recorded
/// about it.
fn round_text(out: &mut String, job: &str, r: &serde_json::Value) {
    let _ = writeln!(out, "job       {job}");
    let _ = writeln!(
        out,
        "round     {} ({})",
        field(r, "round"),
        field(r, "state")
    );
    let _ = writeln!(out, "base      {}", field(r, "base_model"));
    let _ = writeln!(out, "model     {}", field(r, "model"));
    let _ = writeln!(out, "duration  {}", duration_ms(r));
    let selected: Vec<String> = list(r, "selected")
        .iter()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect();
    let _ = writeln!(
        out,
        "selected  {} ({}), offer waves {}, restarts {}",
        selected.len(),
        selected.join(", "),
        field(r, "attempts"),
        field(r, "restarts")
    );
    if let Some(m) = r.get("metrics").and_then(serde_json::Value::as_object)
        && !m.is_empty()
    {
        let text: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "metrics   {}", text.join("  "));
    }
    let details = list(r, "update_details");
    let detail = |site: &str, hash: &str| {
        details.iter().find(|d| {
            d.get("site").and_then(serde_json::Value::as_str) == Some(site)
                && d.get("payload_hash").and_then(serde_json::Value::as_str) == Some(hash)
        })
    };
    let mut rows = Vec::new();
    for u in list(r, "accepted") {
        let site = field(&u, "site");
        let hash = field(&u, "payload_hash");
        let d = detail(&site, &hash);
        rows.push(vec![
            site.clone(),
            "accepted".into(),
            short(&hash),
            field(&u, "bytes"),
            d.map_or_else(|| "-".into(), |d| field(d, "upload_ms")),
            field(&u, "num_examples"),
            d.map_or_else(|| "-".into(), |d| metric(d, "loss")),
            d.map_or_else(|| "-".into(), |d| metric(d, "accuracy")),
            String::new(),
        ]);
    }
    for u in list(r, "rejected") {
        rows.push(vec![
            field(&u, "site"),
            "rejected".into(),
            short(&field(&u, "payload_hash")),
            field(&u, "bytes"),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            field(&u, "reason"),
        ]);
    }
    for d in list(r, "declined") {
        rows.push(vec![
            field(&d, "site"),
            "declined".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            format!("offer declined: {}", field(&d, "reason")),
        ]);
    }
    for u in list(r, "discarded") {
        rows.push(vec![
            field(&u, "site"),
            "discarded".into(),
            short(&field(&u, "payload_hash")),
            field(&u, "bytes"),
            "-".into(),
            field(&u, "num_examples"),
            "-".into(),
            "-".into(),
            "accepted before a restart; not aggregated".into(),
        ]);
    }
    out.push('\n');
    out.push_str(&table(
        &[
            "SITE",
            "UPDATE",
            "PAYLOAD",
            "BYTES",
            "UPLOAD MS",
            "EXAMPLES",
            "LOSS",
            "ACCURACY",
            "REASON",
        ],
        &rows,
    ));
    evaluation_field(out, r, "evaluation", "federated evaluation");
    evaluation_field(out, r, "final_evaluation", "evaluation of the final model");
    let reported: std::collections::BTreeSet<String> = rows.iter().map(|r| r[0].clone()).collect();
    let silent: Vec<&String> = selected.iter().filter(|s| !reported.contains(*s)).collect();
    if !silent.is_empty() {
        let _ = writeln!(
            out,
            "\nselected but did not report: {}",
            silent
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

/// The answer as readable text.
pub(super) fn text(resp: &AdminResponse) -> String {
    let mut out = String::new();
    match resp {
        AdminResponse::Status(s) => {
            let _ = writeln!(out, "federation   {}", s.federation);
            let _ = writeln!(
                out,
                "coordinator  {} (up {} s)",
                s.coordinator_version, s.uptime_secs
            );
            match &s.current_job {
                Some(j) => {
                    let _ = writeln!(
                        out,
                        "job          {} ({}{}), round {} of {}, {} completed, {} accepted",
                        j.job,
                        j.phase,
                        if j.paused { ", paused" } else { "" },
                        opt(j.round),
                        j.total_rounds,
                        j.completed_rounds,
                        j.accepted
                    );
                    let _ = writeln!(out, "model        {}", j.current_model);
                    if let Some(o) = &j.outcome {
                        let _ = writeln!(out, "outcome      {o}");
                    }
                    out.push('\n');
                    out.push_str(&table(
                        &["SITE", "STATE", "CONNECTED", "PEER"],
                        &j.sites
                            .iter()
                            .map(|p| {
                                let link = s.links.iter().find(|l| l.site == p.site);
                                vec![
                                    p.site.to_string(),
                                    p.state.clone(),
                                    match (link, p.connected) {
                                        (Some(l), _) => {
                                            format!("{} {:.1} ms", l.route(), l.rtt_ms)
                                        }
                                        (None, true) => "yes".into(),
                                        (None, false) => "no".into(),
                                    },
                                    link.map_or_else(|| "-".into(), |l| l.remote.clone()),
                                ]
                            })
                            .collect::<Vec<_>>(),
                    ));
                    if let Some(e) = &j.evaluation {
                        out.push('\n');
                        evaluation_text(&mut out, e);
                    }
                }
                None => {
                    let _ = writeln!(
                        out,
                        "job          none running (submit one: fedlink jobs submit <job.toml>)"
                    );
                    let _ = writeln!(
                        out,
                        "sites        {} connected{}",
                        s.connected_sites.len(),
                        if s.connected_sites.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", comma_list(&s.connected_sites))
                        }
                    );
                }
            }
            let _ = writeln!(
                out,
                "\nqueued jobs  {}",
                if s.queued_jobs.is_empty() {
                    "none".into()
                } else {
                    comma_list(&s.queued_jobs)
                }
            );
        }
        AdminResponse::Sites(sites) => out.push_str(&site_rows(sites)),
        AdminResponse::Site(s) => {
            for (k, v) in [
                ("site", s.name.to_string()),
                ("identity", s.identity.clone()),
                ("connected", connected_cell(s)),
                (
                    "peer address",
                    s.link
                        .as_ref()
                        .map_or_else(|| "-".into(), |l| l.remote.clone()),
                ),
                ("cert serial", s.cert_serial.clone()),
                ("cert fingerprint", s.cert_fingerprint.clone()),
                ("update key", s.update_public_key.clone()),
                ("added", s.added_at.clone()),
                ("renewed", opt(s.renewed_at.clone())),
                ("max examples", opt(s.max_examples)),
                ("last seen (unix ms)", opt(s.last_seen_unix_ms)),
                ("updates aggregated", opt(s.updates_aggregated)),
            ] {
                let _ = writeln!(out, "{k:<20} {v}");
            }
        }
        AdminResponse::Jobs(jobs) => out.push_str(&job_rows(jobs)),
        AdminResponse::Job(j) => {
            out.push_str(&job_rows(std::slice::from_ref(j)));
            if let Some(t) = &j.job_toml {
                let _ = write!(out, "\n{t}");
            }
        }
        AdminResponse::Rounds { job, rounds } => {
            let _ = writeln!(out, "job {job}");
            out.push_str(&table(
                &["ROUND", "STATE", "ACCEPTED", "SELECTED", "BASE", "MODEL"],
                &rounds
                    .iter()
                    .map(|r| {
                        vec![
                            field(r, "round"),
                            field(r, "state"),
                            field(r, "accepted"),
                            field(r, "selected"),
                            short(&field(r, "base_model")),
                            short(&field(r, "model")),
                        ]
                    })
                    .collect::<Vec<_>>(),
            ));
        }
        AdminResponse::Round { job, round } => round_text(&mut out, job.as_str(), round),
        AdminResponse::Models(models) => out.push_str(&table(
            &["MODEL", "JOB", "ROUND", "BYTES"],
            &models
                .iter()
                .map(|m| {
                    vec![
                        m.hash.to_string(),
                        m.job.to_string(),
                        m.round.to_string(),
                        opt(m.bytes),
                    ]
                })
                .collect::<Vec<_>>(),
        )),
        AdminResponse::Model { model, provenance } => {
            let _ = writeln!(out, "model  {}", model.hash);
            let _ = writeln!(out, "job    {}", model.job);
            let _ = writeln!(out, "round  {}", model.round);
            let _ = writeln!(out, "bytes  {}", opt(model.bytes));
            if let Some(steps) = provenance {
                let _ = writeln!(
                    out,
                    "\nprovenance ({} rounds from the initial model):",
                    steps.len()
                );
                for s in steps {
                    let _ = writeln!(
                        out,
                        "  round {}: {} -> {}  strategy {}",
                        s.round,
                        short(&s.base_model.to_hex()),
                        short(&s.output_model.to_hex()),
                        s.strategy
                            .get("name")
                            .map_or_else(|| s.strategy.to_string(), |n| n.to_string())
                    );
                    for u in &s.updates {
                        let _ = writeln!(
                            out,
                            "    {} payload {} examples {} sig {}",
                            u.site,
                            short(&u.payload_hash.to_hex()),
                            u.num_examples,
                            u.envelope_sig.as_deref().map_or_else(|| "-".into(), short)
                        );
                    }
                }
            }
        }
        AdminResponse::Export(h) => {
            let _ = writeln!(out, "export of {} ({} tensors)", h.model, h.tensors.len());
        }
        AdminResponse::Error { code, message } => {
            let _ = writeln!(out, "error ({code:?}): {message}");
        }
        _ => {
            let _ = writeln!(out, "{}", json(resp).unwrap_or_default());
        }
    }
    out
}
