//! The job queue: which job runs next.
//!
//! One job runs at a time. Submitted jobs queue behind it (the queue file
//! is the driver's business); when none runs — at start, or when the
//! running job has finished — the first submitted job that has not finished
//! and is not the current one starts, and the held sites are handed to it
//! ([`super::Sites::hand_over`]).

/// The job to run next: the first of `queue` (in submission order) that is
/// not `current` and for which `unfinished` says it has not finished.
pub fn next_job<'q>(
    queue: &'q [String],
    current: Option<&str>,
    unfinished: impl FnMut(&str) -> bool,
) -> Option<&'q str> {
    waiting(queue, current, unfinished).next()
}

/// The queued jobs (`status`): those of `queue` (in submission order)
/// that are not `current` and for which `unfinished` says they have not
/// finished — [`next_job`] is the first of them.
pub fn queued<'q>(
    queue: &'q [String],
    current: Option<&str>,
    unfinished: impl FnMut(&str) -> bool,
) -> Vec<&'q str> {
    waiting(queue, current, unfinished).collect()
}

/// The jobs of `queue` that wait, in submission order: not `current`, and
/// not finished by `unfinished` (asked lazily, of each in turn).
fn waiting<'q>(
    queue: &'q [String],
    current: Option<&str>,
    mut unfinished: impl FnMut(&str) -> bool,
) -> impl Iterator<Item = &'q str> {
    queue
        .iter()
        .map(String::as_str)
        .filter(move |id| Some(*id) != current && unfinished(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_unfinished_job_other_than_the_current_runs_next() {
        let q: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        assert_eq!(next_job(&q, None, |_| true), Some("a"));
        assert_eq!(next_job(&q, Some("a"), |_| true), Some("b"));
        assert_eq!(next_job(&q, Some("a"), |id| id != "b"), Some("c"));
        assert_eq!(next_job(&q, Some("c"), |id| id == "c"), None);
        assert_eq!(next_job(&[], None, |_| true), None);
        assert_eq!(queued(&q, Some("a"), |id| id != "b"), ["c"]);
        assert_eq!(queued(&q, None, |_| true), ["a", "b", "c"]);
        for current in [None, Some("a"), Some("b"), Some("c")] {
            let unfinished = |id: &str| id != "b";
            assert_eq!(
                next_job(&q, current, unfinished),
                queued(&q, current, unfinished).first().copied()
            );
        }
    }
}
