//! Round state machine tests, driven by the [`Sim`] harness (no sockets, no
//! sleeps, virtual time).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::sim::{Behaviour, Sim, SiteScript, fake_hash, initial_model};
use super::*;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A site id the test knows to be valid.
fn sid(s: &str) -> SiteId {
    SiteId::new(s).unwrap()
}

fn cfg(rounds: u64, quorum: u32, min: u32, max: u32) -> RoundConfig {
    RoundConfig {
        rounds,
        seed: 11,
        fraction: 1.0,
        min_sites: min,
        gather: secs(1),
        max_sites: max,
        quorum,
        deadline: secs(60),
        extension: Duration::ZERO,
        max_attempts: 1,
        evaluate_every: 1,
        allow: None,
    }
}

/// Same, without the gather window (for tests that drive the runner by
/// hand).
fn cfg0(rounds: u64, quorum: u32, min: u32, max: u32) -> RoundConfig {
    RoundConfig {
        gather: Duration::ZERO,
        ..cfg(rounds, quorum, min, max)
    }
}

fn epoch() -> Instant {
    Instant::now()
}

fn honest(n: usize, train: u64) -> Vec<SiteScript> {
    (0..n)
        .map(|i| SiteScript::honest(sid(&format!("site-{i}")), secs(train + i as u64)))
        .collect()
}

/// Invariants every run must keep: each aggregation holds each site at
/// most once, only for its round; each accepted update was persisted
/// before it was acked; round numbers of completed rounds increase by one.
fn check_invariants(sim: &Sim) {
    for (round, updates) in sim.aggregates() {
        let sites: BTreeSet<_> = updates.iter().map(|u| &u.site).collect();
        assert_eq!(
            sites.len(),
            updates.len(),
            "a site counted twice in round {round}"
        );
        assert!(updates.iter().all(|u| u.round == *round));
    }
    let actions: Vec<&Action> = sim.actions().iter().map(|(_, a)| a).collect();
    for (i, a) in actions.iter().enumerate() {
        if let Action::AckUpdate { site, round } = a {
            assert!(
                matches!(actions[i - 1], Action::Persist(Checkpoint::UpdateAccepted(u)) if &u.site == site && u.round == *round),
                "ack of {site} round {round} not preceded by its checkpoint"
            );
        }
        if let Action::SendOffer { offer, .. } = a
            && offer.round > RoundId(0)
        {
            let started = actions[..i].iter().any(|b| {
                matches!(b, Action::Persist(Checkpoint::RoundStarted { round, .. }) if *round == offer.round)
            });
            assert!(started, "offer before RoundStarted checkpoint");
        }
    }
    let completed: Vec<u64> = sim
        .checkpoints()
        .iter()
        .filter_map(|c| match c {
            Checkpoint::RoundCompleted { round, .. } => Some(round.0),
            _ => None,
        })
        .collect();
    for (i, r) in completed.iter().enumerate() {
        assert_eq!(*r, i as u64 + 1 + completed[0] - 1);
    }
}

fn count_offers(sim: &Sim, site: &str, round: u64) -> usize {
    sim.site(&sid(site))
        .map(|s| s.offers.iter().filter(|r| r.0 == round).count())
        .unwrap_or(0)
}

#[test]
fn honest_sites_complete_every_round() {
    let mut sim = Sim::new(cfg(3, 3, 3, 10), honest(3, 5), epoch());
    let outcome = sim.drive(secs(3600)).unwrap();
    let JobOutcome::Completed { model } = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(model, sim.runner().current_model());
    assert_ne!(model, initial_model());
    assert_eq!(sim.aggregates().len(), 3);
    for (_, u) in sim.aggregates() {
        assert_eq!(u.len(), 3);
    }
    assert_eq!(sim.runner().completed_rounds(), 3);
    // Every round closed early (all reported), long before the deadline.
    assert!(sim.elapsed() < secs(60), "{:?}", sim.elapsed());
    // Evaluations after every round, job finished persisted before announced.
    let evals = sim
        .actions()
        .iter()
        .filter(|(_, a)| matches!(a, Action::Evaluate { .. }))
        .count();
    assert_eq!(evals, 3);
    let n = sim.actions().len();
    assert!(matches!(
        sim.actions()[n - 2].1,
        Action::Persist(Checkpoint::JobFinished(_))
    ));
    check_invariants(&sim);
}

#[test]
fn checkpoints_chain_models() {
    let mut sim = Sim::new(cfg(2, 2, 2, 10), honest(2, 1), epoch());
    sim.drive(secs(3600)).unwrap();
    let cps = sim.checkpoints();
    let mut base = initial_model();
    for c in &cps {
        match c {
            Checkpoint::RoundStarted { base_model, .. } => assert_eq!(*base_model, base),
            Checkpoint::RoundCompleted { model, updates, .. } => {
                assert_eq!(updates.len(), 2);
                base = *model;
            }
            _ => {}
        }
    }
    assert_eq!(base, sim.runner().current_model());
}

#[test]
fn round_waits_for_min_sites() {
    let mut sites = honest(2, 1);
    sites[1] = sites[1].clone().connecting_at(secs(100));
    let mut sim = Sim::new(cfg(1, 2, 2, 10), sites, epoch());
    sim.run_until(secs(99));
    assert_eq!(
        sim.runner().phase(),
        PhaseView::Waiting {
            next_round: RoundId(1)
        }
    );
    assert!(sim.checkpoints().is_empty());
    assert!(matches!(
        sim.drive(secs(3600)),
        Some(JobOutcome::Completed { .. })
    ));
}

#[test]
fn quorum_closes_at_deadline_when_a_site_stays_silent() {
    let mut sites = honest(2, 5);
    sites.push(SiteScript::new(sid("silent"), Behaviour::Silent));
    let mut sim = Sim::new(cfg(1, 2, 2, 10), sites, epoch());
    sim.run_until(secs(30));
    // Quorum reached, but the silent site is pending: still collecting.
    assert!(matches!(
        sim.runner().phase(),
        PhaseView::Collecting {
            accepted: 2,
            pending: 1,
            ..
        }
    ));
    assert!(matches!(
        sim.drive(secs(3600)),
        Some(JobOutcome::Completed { .. })
    ));
    assert_eq!(sim.aggregates()[0].1.len(), 2);
    // Closed at the deadline, and the silent site was told to stop.
    let (t, _) = sim
        .actions()
        .iter()
        .find(|(_, a)| matches!(a, Action::Aggregate { .. }))
        .unwrap();
    assert_eq!(*t, secs(61), "gather 1 s + deadline 60 s");
    assert_eq!(
        sim.site(&sid("silent")).unwrap().cancelled,
        vec![RoundId(1)]
    );
    check_invariants(&sim);
}

#[test]
fn straggler_past_deadline_is_rejected_round_closed() {
    let mut sites = honest(2, 5);
    sites.push(SiteScript::new(
        sid("slow"),
        Behaviour::Straggler { train: secs(90) },
    ));
    let mut sim = Sim::new(cfg(2, 2, 2, 10), sites, epoch());
    assert!(matches!(
        sim.drive(secs(3600)),
        Some(JobOutcome::Completed { .. })
    ));
    // Round 1 closed at its deadline without the straggler, which was told
    // to stop; it uploaded anyway during round 2: rejected, not counted.
    assert!(
        sim.aggregates()
            .iter()
            .all(|(_, u)| u.iter().all(|u| u.site.as_str() != "slow"))
    );
    let slow = sim.site(&sid("slow")).unwrap();
    assert!(slow.cancelled.contains(&RoundId(1)));
    assert_eq!(slow.rejected[0], (RoundId(1), RejectReason::RoundClosed));
    assert!(slow.acked.is_empty());
    check_invariants(&sim);
}

#[test]
fn late_upload_for_a_closed_round_is_rejected() {
    let mut sim = Sim::new(cfg(2, 2, 2, 10), honest(2, 1), epoch());
    sim.drive(secs(3600)).unwrap();
    // A site re-sends its round-1 update long after round 1 closed.
    let late = UpdateReceived {
        site: sid("site-0"),
        round: RoundId(1),
        base_model: initial_model(),
        payload_hash: fake_hash(&[b"late"]),
        num_examples: 10,
        bytes: 10,
        received_unix_ms: 0,
        verdict: Verdict::Valid,
    };
    // While the job still runs (another job instance with 3 rounds).
    let mut sim2 = Sim::new(cfg(3, 2, 2, 10), honest(2, 1), epoch());
    sim2.inject(
        Duration::from_millis(3500),
        Input::UpdateReceived(late.clone()),
    );
    sim2.drive(secs(3600)).unwrap();
    assert!(
        sim2.site(&sid("site-0"))
            .unwrap()
            .rejected
            .contains(&(RoundId(1), RejectReason::RoundClosed))
    );
    check_invariants(&sim2);
    // After the job finished.
    sim.inject(sim.elapsed() + secs(1), Input::UpdateReceived(late));
    sim.drive(secs(7200));
    assert_eq!(
        sim.site(&sid("site-0")).unwrap().rejected,
        vec![(RoundId(1), RejectReason::JobNotRunning)]
    );
}

#[test]
fn deadline_is_extended_once_for_a_working_site() {
    let mut c = cfg(1, 2, 2, 10);
    c.extension = secs(30);
    let sites = vec![
        SiteScript::honest(sid("fast"), secs(5)),
        SiteScript::honest(sid("slow"), secs(75)),
    ];
    let mut sim = Sim::new(c, sites, epoch());
    assert!(matches!(
        sim.drive(secs(3600)),
        Some(JobOutcome::Completed { .. })
    ));
    let agg = &sim.aggregates()[0].1;
    assert_eq!(agg.len(), 2);
    // Closed when the slow site reported, inside the extension.
    let (t, _) = sim
        .actions()
        .iter()
        .find(|(_, a)| matches!(a, Action::Aggregate { .. }))
        .unwrap();
    assert!(*t > secs(60) && *t < secs(90), "{t:?}");
    check_invariants(&sim);
}

#[test]
fn no_quorum_fails_the_job_after_the_last_wave() {
    let mut c = cfg(3, 2, 2, 10);
    c.extension = secs(10);
    c.max_attempts = 2;
    let sites = vec![
        SiteScript::honest(sid("ok"), secs(1)),
        SiteScript::new(sid("mute"), Behaviour::Silent),
    ];
    let mut sim = Sim::new(c, sites, epoch());
    let outcome = sim.drive(secs(3600)).unwrap();
    assert_eq!(
        outcome,
        JobOutcome::Failed {
            round: RoundId(1),
            reason: FailReason::NoQuorum {
                accepted: 1,
                quorum: 2,
                attempts: 2
            }
        }
    );
    // gather 1 + deadline 60 + extension 10, then a second wave of 60 (no
    // new sites, the silent one still pending) + its own extension 10.
    assert_eq!(sim.elapsed(), secs(141));
    assert!(sim.aggregates().is_empty());
    assert_eq!(sim.site(&sid("mute")).unwrap().cancelled, vec![RoundId(1)]);
}

/// A seed whose first wave selects `site` among `eligible` (k of them).
fn seed_selecting(site: &str, eligible: &[SiteId], k: usize, round: u64) -> u64 {
    (0..1000)
        .find(|seed| {
            select_sites(*seed, RoundId(round), 1, eligible, k)
                .iter()
                .any(|s| s.as_str() == site)
        })
        .unwrap()
}

#[test]
fn declined_offer_triggers_a_new_wave_with_a_fresh_site() {
    let eligible: Vec<SiteId> = vec![sid("a"), sid("b"), sid("c")];
    let mut c = cfg(1, 2, 2, 2);
    c.max_attempts = 2;
    c.seed = seed_selecting("a", &eligible, 2, 1);
    let sites = vec![
        SiteScript::new(sid("a"), Behaviour::Decline),
        SiteScript::honest(sid("b"), secs(3)),
        SiteScript::honest(sid("c"), secs(4)),
    ];
    let mut sim = Sim::new(c, sites, epoch());
    assert!(matches!(
        sim.drive(secs(3600)),
        Some(JobOutcome::Completed { .. })
    ));
    let waves: Vec<(u32, Vec<SiteId>)> = sim
        .checkpoints()
        .into_iter()
        .filter_map(|c| match c {
            Checkpoint::RoundStarted {
                attempt, selected, ..
            } => Some((attempt, selected)),
            _ => None,
        })
        .collect();
    assert_eq!(waves.len(), 2, "{waves:?}");
    assert_eq!(waves[1].1.len(), 1);
    assert!(!waves[0].1.contains(&waves[1].1[0]));
    let agg: BTreeSet<_> = sim.aggregates()[0]
        .1
        .iter()
        .map(|u| u.site.as_str())
        .collect();
    assert_eq!(agg, BTreeSet::from(["b", "c"]));
    // The second wave started right after the decline + first report, not
    // at the deadline.
    assert!(sim.elapsed() < secs(60));
    check_invariants(&sim);
}

#[test]
fn dropout_mid_training_is_not_counted() {
    let mut sites = honest(2, 5);
    sites.push(SiteScript::new(
        sid("drop"),
        Behaviour::DropoutAt {
            at: secs(2),
            train: secs(5),
        },
    ));
    let mut sim = Sim::new(cfg(2, 2, 2, 10), sites, epoch());
    let outcome = sim.drive(secs(3600)).unwrap();
    assert!(matches!(outcome, JobOutcome::Completed { .. }));
    assert!(
        sim.aggregates()
            .iter()
            .all(|(_, u)| u.iter().all(|u| u.site.as_str() != "drop"))
    );
    // Round 1 had to wait for its deadline (the dropped site was pending);
    // round 2 did not select it (not connected).
    assert_eq!(sim.aggregates()[0].1.len(), 2);
    assert_eq!(count_offers(&sim, "drop", 2), 0);
    check_invariants(&sim);
}

#[test]
fn reconnecting_site_gets_its_offer_again_and_counts_once() {
    let sites = vec![
        SiteScript::honest(sid("a"), secs(3)),
        SiteScript::new(
            sid("r"),
            Behaviour::Reconnects {
                at: secs(2),
                after: secs(5),
                train: secs(10),
            },
        ),
    ];
    let mut sim = Sim::new(cfg(1, 2, 2, 10), sites, epoch());
    assert!(matches!(
        sim.drive(secs(3600)),
        Some(JobOutcome::Completed { .. })
    ));
    assert_eq!(count_offers(&sim, "r", 1), 2);
    let r = sim.site(&sid("r")).unwrap();
    assert_eq!(r.acked, vec![RoundId(1)]);
    assert_eq!(r.uploads, 1, "the first training died with the connection");
    assert_eq!(sim.aggregates()[0].1.len(), 2);
    check_invariants(&sim);
}

#[test]
fn duplicate_upload_is_rejected_and_counted_once() {
    let mut sites = honest(2, 5);
    sites.push(SiteScript::new(
        sid("dup"),
        Behaviour::Duplicate {
            train: secs(1),
            again_after: secs(1),
        },
    ));
    let mut sim = Sim::new(cfg(1, 3, 3, 10), sites, epoch());
    assert!(matches!(
        sim.drive(secs(3600)),
        Some(JobOutcome::Completed { .. })
    ));
    let d = sim.site(&sid("dup")).unwrap();
    assert_eq!(d.uploads, 2);
    assert_eq!(d.acked, vec![RoundId(1)]);
    assert_eq!(d.rejected, vec![(RoundId(1), RejectReason::Duplicate)]);
    assert_eq!(sim.aggregates()[0].1.len(), 3);
    check_invariants(&sim);
}

#[test]
fn unknown_site_is_rejected() {
    let mut sim = Sim::new(cfg(1, 1, 1, 10), honest(1, 5), epoch());
    sim.inject(
        secs(1),
        Input::UpdateReceived(UpdateReceived {
            site: sid("ghost"),
            round: RoundId(1),
            base_model: initial_model(),
            payload_hash: fake_hash(&[b"g"]),
            num_examples: 1,
            bytes: 1,
            received_unix_ms: 0,
            verdict: Verdict::Valid,
        }),
    );
    sim.drive(secs(3600)).unwrap();
    let rejected: Vec<_> = sim
        .actions()
        .iter()
        .filter_map(|(_, a)| match a {
            Action::RejectUpdate { site, reason, .. } => Some((site.clone(), reason.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(rejected, vec![(sid("ghost"), RejectReason::UnknownSite)]);
    assert_eq!(sim.aggregates()[0].1.len(), 1);
}

#[test]
fn invalid_and_stale_updates_are_rejected_and_not_resubmittable() {
    let sites = vec![
        SiteScript::honest(sid("ok"), secs(2)),
        SiteScript::honest(sid("ok2"), secs(2)),
        SiteScript::new(sid("bad"), Behaviour::Invalid { train: secs(1) }),
        SiteScript::new(sid("old"), Behaviour::StaleModel { train: secs(1) }),
    ];
    let mut sim = Sim::new(cfg(1, 2, 2, 10), sites, epoch());
    assert!(matches!(
        sim.drive(secs(3600)),
        Some(JobOutcome::Completed { .. })
    ));
    let bad = sim.site(&sid("bad")).unwrap();
    assert!(matches!(
        bad.rejected[..],
        [(RoundId(1), RejectReason::Invalid(_))]
    ));
    assert_eq!(
        sim.site(&sid("old")).unwrap().rejected,
        vec![(RoundId(1), RejectReason::StaleModel)]
    );
    // The invalid site has reported (it is not pending) but the stale one
    // has not; the round closes at the deadline with the two good updates.
    assert_eq!(sim.aggregates()[0].1.len(), 2);
    check_invariants(&sim);
}

#[test]
fn unselected_and_future_round_uploads_are_rejected() {
    let mut runner = JobRunner::new(cfg0(5, 1, 1, 1), initial_model());
    let t0 = epoch();
    for (i, s) in ["a", "b"].iter().enumerate() {
        runner.handle(
            t0,
            Input::SiteConnected {
                site: sid(s),
                conn: ConnId(i as u64),
                capabilities: SiteCapabilities::compatible(),
            },
        );
    }
    let selected = runner.selected_sites();
    assert_eq!(selected.len(), 1);
    let other = sid(if selected[0].as_str() == "a" {
        "b"
    } else {
        "a"
    });
    assert_eq!(
        runner.check_upload(&other, RoundId(1)),
        Err(RejectReason::NotSelected)
    );
    assert_eq!(
        runner.check_upload(&selected[0], RoundId(2)),
        Err(RejectReason::WrongRound)
    );
    assert_eq!(runner.check_upload(&selected[0], RoundId(1)), Ok(()));
    assert_eq!(
        runner.check_upload(&sid("zed"), RoundId(1)),
        Err(RejectReason::UnknownSite)
    );
}

#[test]
fn incompatible_sites_are_never_selected() {
    let mut sites = honest(2, 1);
    let mut inc = SiteScript::honest(sid("old-agent"), secs(1));
    inc.compatible = false;
    sites.push(inc);
    let mut sim = Sim::new(cfg(2, 2, 2, 10), sites, epoch());
    sim.drive(secs(3600)).unwrap();
    assert!(sim.site(&sid("old-agent")).unwrap().offers.is_empty());
}

#[test]
fn allow_list_disconnects_other_sites() {
    let mut c = cfg(1, 1, 1, 10);
    c.allow = Some(BTreeSet::from([sid("site-0")]));
    let mut sim = Sim::new(c, honest(2, 1), epoch());
    assert!(matches!(
        sim.drive(secs(3600)),
        Some(JobOutcome::Completed { .. })
    ));
    assert_eq!(sim.site(&sid("site-1")).unwrap().kicked, 1);
    assert!(sim.site(&sid("site-1")).unwrap().offers.is_empty());
}

#[test]
fn a_second_connection_replaces_the_first_and_stale_disconnects_are_ignored() {
    let mut runner = JobRunner::new(cfg0(1, 1, 1, 10), initial_model());
    let t0 = epoch();
    let caps = SiteCapabilities::compatible();
    runner.handle(
        t0,
        Input::SiteConnected {
            site: sid("a"),
            conn: ConnId(1),
            capabilities: caps.clone(),
        },
    );
    while runner.poll_action().is_some() {}
    runner.handle(
        t0,
        Input::SiteConnected {
            site: sid("a"),
            conn: ConnId(2),
            capabilities: caps,
        },
    );
    let actions: Vec<Action> = std::iter::from_fn(|| runner.poll_action()).collect();
    assert!(actions.contains(&Action::Disconnect {
        site: sid("a"),
        conn: ConnId(1),
        reason: DisconnectReason::Replaced
    }));
    // The site was pending in round 1: it gets its offer again.
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::SendOffer { site, .. } if site.as_str() == "a"))
    );
    runner.handle(
        t0,
        Input::SiteDisconnected {
            site: sid("a"),
            conn: ConnId(1),
        },
    );
    assert_eq!(runner.connected_sites(), vec![sid("a")]);
}

#[test]
fn pause_holds_the_next_round_and_resume_releases_it() {
    let mut sim = Sim::new(cfg(2, 2, 2, 10), honest(2, 5), epoch());
    sim.admin(secs(1), AdminCommand::Pause);
    sim.admin(secs(500), AdminCommand::Resume);
    sim.run_until(secs(400));
    // Round 1 ran to completion, round 2 did not start.
    assert_eq!(sim.runner().completed_rounds(), 1);
    assert_eq!(
        sim.runner().phase(),
        PhaseView::Waiting {
            next_round: RoundId(2)
        }
    );
    assert!(sim.runner().is_paused());
    assert!(matches!(
        sim.drive(secs(3600)),
        Some(JobOutcome::Completed { .. })
    ));
    let paused: Vec<bool> = sim
        .checkpoints()
        .iter()
        .filter_map(|c| match c {
            Checkpoint::Paused(p) => Some(*p),
            _ => None,
        })
        .collect();
    assert_eq!(paused, vec![true, false]);
}

#[test]
fn abort_cancels_the_round_in_flight() {
    let mut sim = Sim::new(cfg(5, 2, 2, 10), honest(2, 20), epoch());
    sim.admin(secs(10), AdminCommand::Abort);
    let outcome = sim.drive(secs(3600)).unwrap();
    assert_eq!(
        outcome,
        JobOutcome::Aborted {
            completed_rounds: 0
        }
    );
    assert_eq!(
        sim.site(&sid("site-0")).unwrap().cancelled,
        vec![RoundId(1)]
    );
    assert!(sim.aggregates().is_empty());
    assert_eq!(sim.runner().poll_timeout(), None);
}

#[test]
fn aggregation_failure_fails_the_job() {
    let mut runner = JobRunner::new(cfg0(2, 1, 1, 10), initial_model());
    let t0 = epoch();
    runner.handle(
        t0,
        Input::SiteConnected {
            site: sid("a"),
            conn: ConnId(1),
            capabilities: SiteCapabilities::compatible(),
        },
    );
    runner.handle(
        t0,
        Input::UpdateReceived(UpdateReceived {
            site: sid("a"),
            round: RoundId(1),
            base_model: initial_model(),
            payload_hash: fake_hash(&[b"x"]),
            num_examples: 1,
            bytes: 1,
            received_unix_ms: 0,
            verdict: Verdict::Valid,
        }),
    );
    assert_eq!(runner.phase(), PhaseView::Aggregating { round: RoundId(1) });
    // A result for another round is ignored.
    runner.handle(
        t0,
        Input::AggregationDone {
            round: RoundId(2),
            model: fake_hash(&[b"m"]),
            metrics: BTreeMap::new(),
        },
    );
    assert_eq!(runner.phase(), PhaseView::Aggregating { round: RoundId(1) });
    runner.handle(
        t0,
        Input::AggregationFailed {
            round: RoundId(1),
            reason: "robust aggregator: too few updates".into(),
        },
    );
    assert!(matches!(
        runner.phase(),
        PhaseView::Finished(JobOutcome::Failed {
            round: RoundId(1),
            reason: FailReason::Aggregation(_)
        })
    ));
}

#[test]
fn time_going_backwards_is_clamped() {
    let mut runner = JobRunner::new(cfg0(1, 1, 1, 10), initial_model());
    let t0 = epoch();
    let later = t0 + secs(100);
    runner.handle(
        later,
        Input::SiteConnected {
            site: sid("a"),
            conn: ConnId(1),
            capabilities: SiteCapabilities::compatible(),
        },
    );
    assert_eq!(runner.poll_timeout(), Some(later + secs(60)));
    // An earlier `now` is treated as `later`: nothing fires, nothing panics.
    runner.handle(t0, Input::Timeout);
    assert!(matches!(runner.phase(), PhaseView::Collecting { .. }));
    runner.handle(later + secs(60), Input::Timeout);
    assert!(matches!(runner.phase(), PhaseView::Finished(_)));
}

#[test]
fn resume_starts_after_the_last_completed_round() {
    let model = fake_hash(&[b"after round 2"]);
    let runner = JobRunner::resume(
        cfg(4, 2, 2, 10),
        Snapshot {
            completed_rounds: 2,
            model,
            paused: false,
            outcome: None,
        },
    );
    let mut sim = Sim::with_runner(runner, honest(2, 1), epoch());
    assert!(matches!(
        sim.drive(secs(3600)),
        Some(JobOutcome::Completed { .. })
    ));
    let rounds: Vec<u64> = sim.aggregates().iter().map(|(r, _)| r.0).collect();
    assert_eq!(rounds, vec![3, 4]);
    let first_base = sim.checkpoints().into_iter().find_map(|c| match c {
        Checkpoint::RoundStarted { base_model, .. } => Some(base_model),
        _ => None,
    });
    assert_eq!(first_base, Some(model));
}

#[test]
fn resume_of_a_fully_completed_job_finishes_it() {
    let model = fake_hash(&[b"final"]);
    let mut runner = JobRunner::resume(
        cfg(2, 1, 1, 10),
        Snapshot {
            completed_rounds: 2,
            model,
            paused: false,
            outcome: None,
        },
    );
    assert_eq!(
        runner.poll_action(),
        Some(Action::Persist(Checkpoint::JobFinished(
            JobOutcome::Completed { model }
        )))
    );
    assert_eq!(
        runner.poll_action(),
        Some(Action::JobFinished(JobOutcome::Completed { model }))
    );
}

#[test]
fn selection_is_deterministic_and_order_independent() {
    let sites: Vec<SiteId> = (0..20).map(|i| sid(&format!("h{i:02}"))).collect();
    let mut rev = sites.clone();
    rev.reverse();
    let a = select_sites(5, RoundId(3), 1, &sites, 7);
    assert_eq!(a.len(), 7);
    assert_eq!(a, select_sites(5, RoundId(3), 1, &rev, 7));
    assert_ne!(
        a,
        select_sites(5, RoundId(4), 1, &sites, 7),
        "rounds differ"
    );
    assert_ne!(a, select_sites(6, RoundId(3), 1, &sites, 7), "seeds differ");
    assert_eq!(select_sites(5, RoundId(3), 1, &sites, 100).len(), 20);
    // Every site gets picked sometimes.
    let mut seen = BTreeSet::new();
    for r in 0..50 {
        seen.extend(select_sites(1, RoundId(r), 1, &sites, 3));
    }
    assert_eq!(seen.len(), 20);
}

#[test]
fn target_respects_fraction_min_and_max() {
    let mut c = cfg(1, 1, 2, 5);
    c.fraction = 0.3;
    assert_eq!(c.target(1), 1);
    assert_eq!(c.target(4), 2);
    assert_eq!(c.target(10), 3);
    assert_eq!(c.target(100), 5);
}

#[test]
fn fraction_selects_a_subset_each_round() {
    let mut c = cfg(4, 2, 2, 10);
    c.fraction = 0.5;
    let mut sim = Sim::new(c, honest(6, 1), epoch());
    assert!(matches!(
        sim.drive(secs(3600)),
        Some(JobOutcome::Completed { .. })
    ));
    for (_, u) in sim.aggregates() {
        assert_eq!(u.len(), 3);
    }
    check_invariants(&sim);
}

/// Mixed populations over many seeds: the invariants hold, every job ends.
#[test]
fn random_mixes_keep_the_invariants() {
    for seed in 0..60u64 {
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let n = 3 + next(6) as usize;
        let sites: Vec<SiteScript> = (0..n)
            .map(|i| {
                let id = format!("s{i}");
                let train = secs(1 + next(90));
                let b = match next(9) {
                    0 => Behaviour::Decline,
                    7 => Behaviour::Straggler { train },
                    1 => Behaviour::Silent,
                    2 => Behaviour::DropoutAt {
                        at: secs(next(200)),
                        train,
                    },
                    3 => Behaviour::Reconnects {
                        at: secs(next(200)),
                        after: secs(1 + next(30)),
                        train,
                    },
                    4 => Behaviour::Duplicate {
                        train,
                        again_after: secs(next(100)),
                    },
                    5 => Behaviour::Invalid { train },
                    _ => Behaviour::Honest { train },
                };
                SiteScript::new(sid(&id), b).connecting_at(secs(next(20)))
            })
            .collect();
        let mut c = cfg(3, 2, 2, 1 + next(n as u64) as u32);
        c.min_sites = 2.min(c.max_sites);
        c.quorum = c.min_sites;
        c.seed = seed;
        c.extension = secs(next(2) * 20);
        c.max_attempts = 1 + next(3) as u32;
        let mut sim = Sim::new(c, sites, epoch());
        sim.drive(secs(100_000));
        check_invariants(&sim);
        if sim.outcome().is_none() {
            // Only possible when too few sites are ever eligible to start.
            assert!(
                matches!(sim.runner().phase(), PhaseView::Waiting { .. }),
                "seed {seed}"
            );
        }
        // No update acknowledged twice per site and round.
        for s in 0..n {
            let rec = sim.site(&sid(&format!("s{s}"))).unwrap();
            let set: BTreeSet<_> = rec.acked.iter().collect();
            assert_eq!(set.len(), rec.acked.len(), "seed {seed}");
        }
    }
}

/// The status file's `phase` and the `job finished` log lines print the
/// round machine's phase and a job's outcome as their `Debug` form, with
/// plain round numbers (`round: 3`: `RoundId`'s `Debug` is its wire
/// form): pinned for every variant, so that they read exactly as before
/// rounds were typed.
#[test]
fn phase_and_outcome_texts_read_as_before() {
    fn text(v: &impl std::fmt::Debug) -> String {
        format!("{v:?}")
    }
    let deadline = Instant::now();
    let model = fake_hash(&[b"final"]);
    let completed = JobOutcome::Completed { model };
    let no_quorum = JobOutcome::Failed {
        round: RoundId(2),
        reason: FailReason::NoQuorum {
            accepted: 1,
            quorum: 3,
            attempts: 2,
        },
    };
    let aggregation = JobOutcome::Failed {
        round: RoundId(9),
        reason: FailReason::Aggregation("no aggregator for round 9".into()),
    };
    let aborted = JobOutcome::Aborted {
        completed_rounds: 5,
    };
    let outcomes = [
        (&completed, format!("Completed {{ model: {model:?} }}")),
        (
            &no_quorum,
            "Failed { round: 2, reason: NoQuorum { accepted: 1, quorum: 3, attempts: 2 } }".into(),
        ),
        (
            &aggregation,
            r#"Failed { round: 9, reason: Aggregation("no aggregator for round 9") }"#.into(),
        ),
        (&aborted, "Aborted { completed_rounds: 5 }".into()),
    ];
    for (outcome, want) in &outcomes {
        assert_eq!(text(*outcome), *want);
        let phase = PhaseView::Finished((*outcome).clone());
        assert_eq!(text(&phase), format!("Finished({want})"));
    }
    let phases = [
        (
            PhaseView::Waiting {
                next_round: RoundId(4),
            },
            "Waiting { next_round: 4 }".to_owned(),
        ),
        (
            PhaseView::Collecting {
                round: RoundId(3),
                attempt: 2,
                deadline,
                accepted: 1,
                pending: 5,
            },
            format!(
                "Collecting {{ round: 3, attempt: 2, deadline: {deadline:?}, accepted: 1, pending: 5 }}"
            ),
        ),
        (
            PhaseView::Aggregating { round: RoundId(12) },
            "Aggregating { round: 12 }".to_owned(),
        ),
    ];
    for (phase, want) in &phases {
        assert_eq!(text(phase), *want);
    }
}
