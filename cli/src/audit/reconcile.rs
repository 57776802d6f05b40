//! The comparison behind `fedlink audit reconcile` is the pure library
//! function [`fedlink_audit::reconcile::reconcile`] (entries in, a typed
//! report out); this command only reads and verifies the two logs, calls it
//! and prints the report (see `run_reconcile` in the parent module).

pub(crate) use fedlink_audit::reconcile::{reconcile, site_name};
