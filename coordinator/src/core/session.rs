//! A site's protocol session: the version negotiated in its `Hello` and
//! what that version allows, as decisions over typed inputs.
//!
//! ```text
//!  first message ──▶ Session::from_hello ──▶ Hello or refused (Reject code, text, how closed)
//!  engine → site ──▶ Session::to_site ─────▶ as is / downgraded offer / dropped
//!  site → control ─▶ Session::control ─────▶ handle as X / ignore (head budget) / cut (text)
//!  new stream ─────▶ Session::stream ──────▶ fetch / update fetch / upload / refuse (text)
//!  upload cut ─────▶ Session::keeps_for_resume(durable)
//! ```
//!
//! The driver (`server::site_session`) reads the frames, takes the budgets' tokens
//! with the clock, logs, and executes the answer.

use fedlink_protocol::{
    AuditHead, Bye, Heartbeat, Hello, Message, ModelHash, ModelUpdateFetch, OfferResponse,
    RESUME_VERSION, Reject, RejectCode, SignedEnvelope, SignedEvalReport, VersionRange,
    supports_audit_head, supports_downlink_updates, supports_federated_eval,
    supports_round_outcome,
};

/// The facts negotiated for one site connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    version: u16,
}

/// A site's first control message that does not open a session.
#[derive(Clone, Debug, PartialEq)]
pub enum HelloRefused {
    /// Not a `Hello`: rejected, then the connection is closed with
    /// [`HelloRefused::close_text`] (protocol error).
    NotHello(Reject),
    /// No version in common: rejected, the stream finished, and the site
    /// closes the connection.
    NoCommonVersion(Reject),
}

impl HelloRefused {
    /// The `Reject` the site is sent.
    pub fn reject(&self) -> &Reject {
        match self {
            Self::NotHello(r) | Self::NoCommonVersion(r) => r,
        }
    }

    /// The close text when the coordinator closes the connection itself
    /// (`None`: it waits for the site to close).
    pub fn close_text(&self) -> Option<&'static str> {
        match self {
            Self::NotHello(_) => Some("expected Hello"),
            Self::NoCommonVersion(_) => None,
        }
    }
}

/// What an incoming control message leads to.
#[derive(Clone, Debug, PartialEq)]
pub enum Control {
    /// The site's answer to an offer: to the engine.
    OfferResponse(OfferResponse),
    /// Liveness only.
    Heartbeat(Heartbeat),
    /// A signed evaluation report: to the engine (only at versions with
    /// federated evaluation).
    EvalReport(Box<SignedEvalReport>),
    /// A site's signed audit head within its budget: verified and answered
    /// (only at versions with audit heads).
    AuditHead(AuditHead),
    /// An audit head beyond its budget: ignored, the connection stays.
    IgnoreHead,
    /// The site ends the session: closed normally (`bye`).
    Bye(Bye),
    /// The connection is cut (protocol error) with this reason.
    Cut(Cut),
}

/// Why a control stream is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// More control messages than the budget allows.
    OverBudget,
    /// A message this session does not take on its control stream.
    Unexpected {
        /// The message's name.
        message: &'static str,
    },
}

impl Cut {
    /// The close text (the connection's close reason).
    pub fn text(&self) -> &'static str {
        match self {
            Self::OverBudget => "too many control messages (control_burst, control_per_sec)",
            Self::Unexpected { .. } => "unexpected message on the control stream",
        }
    }
}

/// What a stream the site opens is for, by its first message.
#[derive(Clone, Debug, PartialEq)]
pub enum Stream {
    /// A model download, from record `from_record` on (0: all of it).
    FetchModel {
        /// The model version wanted.
        hash: ModelHash,
        /// The first record to send.
        from_record: u64,
    },
    /// A downlink update's download.
    FetchUpdate(ModelUpdateFetch),
    /// An upload, new or resumed.
    Upload {
        /// The signed header.
        envelope: Box<SignedEnvelope>,
        /// A resume of an interrupted upload.
        resume: bool,
    },
    /// Not a stream this version may open: rejected, the stream finished.
    Refuse(Reject),
}

impl Session {
    /// The session a site's first control message opens, at the newest
    /// version both sides speak.
    pub fn from_hello(first: Message) -> Result<(Self, Hello), HelloRefused> {
        let hello = match first {
            Message::Hello(h) => h,
            other => {
                return Err(HelloRefused::NotHello(Reject {
                    code: RejectCode::UnexpectedMessage,
                    message: format!("expected Hello, got {}", other.name()),
                }));
            }
        };
        match VersionRange::SUPPORTED.negotiate(&hello.versions) {
            Some(version) => Ok((Self { version }, hello)),
            None => Err(HelloRefused::NoCommonVersion(Reject {
                code: RejectCode::UnsupportedVersion,
                message: format!(
                    "no common protocol version: coordinator speaks {:?}, site {:?}",
                    VersionRange::SUPPORTED,
                    hello.versions
                ),
            })),
        }
    }

    /// A session at `version` (as negotiated).
    pub fn at(version: u16) -> Self {
        Self { version }
    }

    /// The negotiated protocol version.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Does the site exchange audit heads?
    pub fn heads(&self) -> bool {
        supports_audit_head(self.version)
    }

    /// Does the site take evaluation requests and send reports?
    pub fn evals(&self) -> bool {
        supports_federated_eval(self.version)
    }

    /// Are transfers resumable (`ResumeUpload`, `ModelFetchFrom`)?
    pub fn resumable(&self) -> bool {
        self.version >= RESUME_VERSION
    }

    /// What a message the engine sends becomes for this site: the offer in
    /// the encoding its version knows (the engine builds the newest; a job
    /// that needs what an older encoding lacks is never offered to it, see
    /// `core::compatibility`), or `None` for a message its version lacks
    /// (audit heads, round outcomes, evaluation requests).
    pub fn to_site(&self, m: Message) -> Option<Message> {
        match m {
            Message::TaskOfferV5(o) | Message::TaskOfferV6(o) => {
                Some(Message::task_offer(*o, self.version))
            }
            Message::AuditHead(_) if !self.heads() => None,
            Message::RoundOutcome(_) if !supports_round_outcome(self.version) => None,
            Message::EvalRequest(_) if !self.evals() => None,
            m => Some(m),
        }
    }

    /// What a control message from the site leads to. `within_budget`: the
    /// control budget had a token for it; `head_within_budget` takes one
    /// from the audit-head budget and is asked for audit heads only (at any
    /// version, before the version is looked at).
    pub fn control(
        &self,
        msg: Message,
        within_budget: bool,
        head_within_budget: impl FnOnce() -> bool,
    ) -> Control {
        if !within_budget {
            return Control::Cut(Cut::OverBudget);
        }
        match msg {
            Message::OfferResponse(r) => Control::OfferResponse(r),
            Message::Heartbeat(h) => Control::Heartbeat(h),
            Message::EvalReport(r) if self.evals() => Control::EvalReport(r),
            Message::AuditHead(h) => {
                if !head_within_budget() {
                    Control::IgnoreHead
                } else if self.heads() {
                    Control::AuditHead(h)
                } else {
                    Control::Cut(Cut::Unexpected {
                        message: Message::AuditHead(h).name(),
                    })
                }
            }
            Message::Bye(b) => Control::Bye(b),
            other => Control::Cut(Cut::Unexpected {
                message: other.name(),
            }),
        }
    }

    /// What a stream the site opens with `first` is for, or its refusal.
    pub fn stream(&self, first: Message) -> Stream {
        let resumable = self.resumable();
        match first {
            Message::ModelFetch(f) => Stream::FetchModel {
                hash: f.hash,
                from_record: 0,
            },
            Message::ModelFetchFrom(f) if resumable => Stream::FetchModel {
                hash: f.hash,
                from_record: f.from_record,
            },
            Message::ModelUpdateFetch(f) if supports_downlink_updates(self.version) => {
                Stream::FetchUpdate(f)
            }
            Message::DeltaUpload(u) => Stream::Upload {
                envelope: Box::new(u.envelope),
                resume: false,
            },
            Message::ResumeUpload(u) if resumable => Stream::Upload {
                envelope: Box::new(u.envelope),
                resume: true,
            },
            other => Stream::Refuse(Reject {
                code: RejectCode::UnexpectedMessage,
                message: format!(
                    "a new stream must start with ModelFetch or DeltaUpload{}, not {}",
                    if resumable {
                        " (or ModelFetchFrom, ResumeUpload)"
                    } else {
                        ""
                    },
                    other.name()
                ),
            }),
        }
    }

    /// Is an upload cut short kept for the site to resume? Only once its
    /// spool is `durable` (a resume appends to exactly those records), and
    /// only at versions that resume.
    pub fn keeps_for_resume(&self, durable: bool) -> bool {
        self.resumable() && durable
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::{Duration, Instant};

    use fedlink_aggregation::StrategyConfig;
    use fedlink_protocol::{
        AUDIT_HEAD_VERSION, Cancel, Capabilities, DOWNLINK_VERSION, DeltaUpload, Encoding,
        EvalReport, EvalRequest, FEDERATED_EVAL_VERSION, FederationId, JobId, MIN_PROTOCOL_VERSION,
        ModelFetch, ModelFetchFrom, OfferDecision, PROTOCOL_VERSION, PayloadHash,
        ROUND_OUTCOME_VERSION, RoundId, RoundOutcome, SiteId, TRAINING_V5_VERSION, TaskOffer,
        UpdateHeader, UpdateNonce, ValueCodec,
    };

    use super::*;
    use crate::core::actions::{JobFacts, OfferTerms};
    use crate::job::Job;
    use crate::round::Offer;

    /// The oldest version, each version where a feature starts, the newest.
    const BOUNDARIES: [u16; 7] = [
        MIN_PROTOCOL_VERSION,
        AUDIT_HEAD_VERSION,
        3,
        ROUND_OUTCOME_VERSION,
        TRAINING_V5_VERSION,
        RESUME_VERSION,
        PROTOCOL_VERSION,
    ];

    fn hello(min: u16, max: u16) -> Message {
        Message::Hello(Hello {
            versions: VersionRange { min, max },
            agent_version: "test".into(),
            capabilities: Capabilities {
                codecs: vec![],
                max_chunk_bytes: 1 << 20,
                features: vec![],
            },
        })
    }

    fn head() -> AuditHead {
        AuditHead {
            seq: 3,
            hash: [7; 32],
            ts_unix_ms: 1_700_000_000_000,
            sig: [1; 64],
        }
    }

    fn job() -> JobId {
        JobId::new("j1").unwrap()
    }

    fn offer() -> TaskOffer {
        let spec = Job::from_toml(
            "id = \"j1\"\nrounds = 3\nseed = 11\narch = { kind = \"logreg\", inputs = 4, classes = 2 }\n\
             init = { seed = 1 }\n[round]\ndeadline_secs = 60\n[strategy]\nname = \"fedavg\"\n",
        )
        .unwrap();
        let facts = JobFacts {
            federation: FederationId::new("fed").unwrap(),
            job: job(),
            actor: "fedlink://fed/coordinator".into(),
        };
        let terms = OfferTerms::of(&spec, &facts, &StrategyConfig::default(), None).unwrap();
        let offer = Offer {
            round: RoundId(1),
            attempt: 1,
            model: ModelHash([7; 32]),
            deadline: Instant::now() + Duration::from_secs(60),
        };
        terms.offer(&offer, 1_000)
    }

    fn key() -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[5; 32])
    }

    fn eval_report() -> Box<SignedEvalReport> {
        let report = EvalReport {
            protocol_version: PROTOCOL_VERSION,
            federation_id: FederationId::new("fed").unwrap(),
            site_id: SiteId::new("site-a").unwrap(),
            job_id: job(),
            round: RoundId(1),
            model: ModelHash([7; 32]),
            metrics: Default::default(),
        };
        Box::new(fedlink_protocol::sign_eval_report(&key(), report))
    }

    fn envelope() -> SignedEnvelope {
        let header = UpdateHeader {
            protocol_version: PROTOCOL_VERSION,
            federation_id: FederationId::new("fed").unwrap(),
            site_id: SiteId::new("site-a").unwrap(),
            job_id: job(),
            round: RoundId(1),
            base_model: ModelHash([7; 32]),
            num_examples: 10,
            encoding: Encoding::with_codec(ValueCodec::F32).unwrap(),
            payload_len: 16,
            payload_hash: PayloadHash([0; 32]),
            nonce: UpdateNonce([1; 16]),
            metrics: None,
            feature_stats: None,
        };
        fedlink_protocol::sign_update(&key(), header)
    }

    #[test]
    fn a_hello_opens_the_newest_common_version() {
        for v in BOUNDARIES {
            let (s, h) = Session::from_hello(hello(MIN_PROTOCOL_VERSION, v)).unwrap();
            assert_eq!(s.version(), v);
            assert_eq!(h.versions.max, v);
        }
        let (s, _) = Session::from_hello(hello(1, u16::MAX)).unwrap();
        assert_eq!(s.version(), PROTOCOL_VERSION);
    }

    #[test]
    fn no_common_version_is_rejected_and_left_for_the_site_to_close() {
        let r = Session::from_hello(hello(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3)).unwrap_err();
        assert!(matches!(r, HelloRefused::NoCommonVersion(_)));
        assert_eq!(r.reject().code, RejectCode::UnsupportedVersion);
        assert_eq!(
            r.reject().message,
            format!(
                "no common protocol version: coordinator speaks {:?}, site {:?}",
                VersionRange::SUPPORTED,
                VersionRange {
                    min: PROTOCOL_VERSION + 1,
                    max: PROTOCOL_VERSION + 3
                }
            )
        );
        assert_eq!(r.close_text(), None);
    }

    #[test]
    fn a_first_message_other_than_hello_is_rejected_and_closed() {
        let r = Session::from_hello(Message::Bye(Bye { reason: "x".into() })).unwrap_err();
        assert_eq!(r.reject().code, RejectCode::UnexpectedMessage);
        assert_eq!(r.reject().message, "expected Hello, got Bye");
        assert_eq!(r.close_text(), Some("expected Hello"));
    }

    #[test]
    fn offers_are_sent_in_the_encoding_of_the_version() {
        let expect = |v: u16| match Session::at(v).to_site(Message::TaskOfferV6(Box::new(offer())))
        {
            Some(Message::TaskOffer(_)) => 1,
            Some(Message::TaskOfferV3(_)) => 3,
            Some(Message::TaskOfferV5(_)) => 5,
            Some(Message::TaskOfferV6(_)) => 6,
            other => panic!("{other:?}"),
        };
        assert_eq!(expect(MIN_PROTOCOL_VERSION), 1);
        assert_eq!(expect(AUDIT_HEAD_VERSION), 1);
        assert_eq!(expect(3), 3);
        assert_eq!(expect(ROUND_OUTCOME_VERSION), 3);
        assert_eq!(expect(TRAINING_V5_VERSION), 5);
        assert_eq!(expect(RESUME_VERSION), 6);
        assert_eq!(expect(PROTOCOL_VERSION), 6);
        // A V5 offer from the engine is re-encoded as well.
        let m = Session::at(PROTOCOL_VERSION).to_site(Message::TaskOfferV5(Box::new(offer())));
        assert!(matches!(m, Some(Message::TaskOfferV6(_))));
    }

    #[test]
    fn messages_a_version_lacks_are_dropped() {
        let outcome = || {
            Message::RoundOutcome(RoundOutcome {
                job_id: job(),
                round: RoundId(1),
                model: ModelHash([7; 32]),
                job_completed: false,
            })
        };
        let request = || {
            let o = offer();
            Message::EvalRequest(Box::new(EvalRequest {
                federation_id: FederationId::new("fed").unwrap(),
                job_id: job(),
                round: RoundId(1),
                model: ModelHash([7; 32]),
                arch: o.arch,
                scaling: None,
            }))
        };
        for v in BOUNDARIES {
            let s = Session::at(v);
            let head_sent = s.to_site(Message::AuditHead(head())).is_some();
            assert_eq!(head_sent, v >= AUDIT_HEAD_VERSION, "v{v}");
            assert_eq!(
                s.to_site(outcome()).is_some(),
                v >= ROUND_OUTCOME_VERSION,
                "v{v}"
            );
            assert_eq!(
                s.to_site(request()).is_some(),
                v >= FEDERATED_EVAL_VERSION,
                "v{v}"
            );
            let cancel = Message::Cancel(Cancel {
                job_id: job(),
                round: RoundId(1),
                reason: "r".into(),
            });
            assert_eq!(s.to_site(cancel.clone()), Some(cancel), "v{v}");
        }
    }

    #[test]
    fn over_the_control_budget_the_connection_is_cut() {
        let mut asked = false;
        let c = Session::at(PROTOCOL_VERSION).control(Message::AuditHead(head()), false, || {
            asked = true;
            true
        });
        assert_eq!(c, Control::Cut(Cut::OverBudget));
        assert_eq!(
            Cut::OverBudget.text(),
            "too many control messages (control_burst, control_per_sec)"
        );
        // The head budget keeps its token.
        assert!(!asked);
    }

    #[test]
    fn audit_heads_take_the_head_budget_at_every_version() {
        for v in BOUNDARIES {
            let s = Session::at(v);
            let mut asked = 0;
            let over = s.control(Message::AuditHead(head()), true, || {
                asked += 1;
                false
            });
            assert_eq!(over, Control::IgnoreHead, "v{v}");
            let within = s.control(Message::AuditHead(head()), true, || {
                asked += 1;
                true
            });
            if v >= AUDIT_HEAD_VERSION {
                assert_eq!(within, Control::AuditHead(head()), "v{v}");
            } else {
                assert_eq!(
                    within,
                    Control::Cut(Cut::Unexpected {
                        message: "AuditHead"
                    })
                );
            }
            assert_eq!(asked, 2);
        }
    }

    #[test]
    fn eval_reports_are_taken_only_from_versions_with_federated_evaluation() {
        for v in BOUNDARIES {
            let c = Session::at(v).control(Message::EvalReport(eval_report()), true, || true);
            if v >= FEDERATED_EVAL_VERSION {
                assert!(matches!(c, Control::EvalReport(_)), "v{v}");
            } else {
                assert_eq!(
                    c,
                    Control::Cut(Cut::Unexpected {
                        message: "EvalReport"
                    }),
                    "v{v}"
                );
            }
        }
    }

    #[test]
    fn offer_answers_heartbeats_and_bye_at_every_version_anything_else_cuts() {
        for v in BOUNDARIES {
            let s = Session::at(v);
            let r = OfferResponse {
                job_id: job(),
                round: RoundId(1),
                decision: OfferDecision::Accept,
            };
            let c = s.control(Message::OfferResponse(r.clone()), true, || true);
            assert_eq!(c, Control::OfferResponse(r));
            let h = Heartbeat {
                seq: 1,
                now_unix_ms: 2,
            };
            let c = s.control(Message::Heartbeat(h), true, || true);
            assert_eq!(c, Control::Heartbeat(h));
            let b = Bye {
                reason: "done".into(),
            };
            let c = s.control(Message::Bye(b.clone()), true, || true);
            assert_eq!(c, Control::Bye(b));
            let c = s.control(hello(1, 1), true, || panic!("not a head"));
            let cut = Cut::Unexpected { message: "Hello" };
            assert_eq!(c, Control::Cut(cut));
            assert_eq!(cut.text(), "unexpected message on the control stream");
        }
    }

    #[test]
    fn the_streams_a_version_may_open() {
        let hash = ModelHash([7; 32]);
        let upload = || DeltaUpload {
            envelope: envelope(),
        };
        for v in BOUNDARIES {
            let s = Session::at(v);
            assert_eq!(
                s.stream(Message::ModelFetch(ModelFetch { hash })),
                Stream::FetchModel {
                    hash,
                    from_record: 0
                }
            );
            assert!(matches!(
                s.stream(Message::DeltaUpload(Box::new(upload()))),
                Stream::Upload { resume: false, .. }
            ));
            let from = s.stream(Message::ModelFetchFrom(ModelFetchFrom {
                hash,
                from_record: 4,
            }));
            let resume = s.stream(Message::ResumeUpload(Box::new(upload())));
            let update = s.stream(Message::ModelUpdateFetch(ModelUpdateFetch {
                hash,
                base: ModelHash([6; 32]),
                from_record: 0,
            }));
            if v >= RESUME_VERSION {
                assert_eq!(
                    from,
                    Stream::FetchModel {
                        hash,
                        from_record: 4
                    }
                );
                assert!(matches!(resume, Stream::Upload { resume: true, .. }));
            } else {
                let Stream::Refuse(r) = from else {
                    panic!("{from:?}")
                };
                assert_eq!(r.code, RejectCode::UnexpectedMessage);
                assert_eq!(
                    r.message,
                    "a new stream must start with ModelFetch or DeltaUpload, not ModelFetchFrom"
                );
                assert!(matches!(resume, Stream::Refuse(_)));
            }
            if v >= DOWNLINK_VERSION {
                assert!(matches!(update, Stream::FetchUpdate(_)));
            } else {
                let Stream::Refuse(r) = update else {
                    panic!("{update:?}")
                };
                let expected = if v >= RESUME_VERSION {
                    "a new stream must start with ModelFetch or DeltaUpload \
                     (or ModelFetchFrom, ResumeUpload), not ModelUpdateFetch"
                } else {
                    "a new stream must start with ModelFetch or DeltaUpload, not ModelUpdateFetch"
                };
                assert_eq!(r.message, expected, "v{v}");
            }
        }
    }

    #[test]
    fn an_interrupted_upload_is_kept_only_if_durable_and_resumable() {
        for v in BOUNDARIES {
            let s = Session::at(v);
            assert_eq!(s.keeps_for_resume(true), v >= RESUME_VERSION, "v{v}");
            assert!(!s.keeps_for_resume(false), "v{v}");
            assert_eq!(s.resumable(), v >= RESUME_VERSION);
        }
    }
}
