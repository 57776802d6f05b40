//! Shutdown after `serve`'s job loop: the upload answers already decided
//! reach their sites, every connection is closed, the acceptor, the
//! reloader and the stream tasks end (each wait bounded), the refused
//! handshakes still counted are recorded and quinn sends its close frames.

use std::time::Duration;

use super::boot::Listening;
use super::engine::Engine;
use super::idle::Idle;
use super::limits;
use super::shared::Shared;

/// How long shutdown waits for connection tasks to record their ends.
const CONNECTIONS_GRACE: Duration = Duration::from_secs(10);

/// Close what `serve` started, in order: the answers' tasks (bounded by
/// [`limits::ANSWER_GRACE`]), the sites' connections (the idle holder's
/// and the engine's), the endpoint and the TCP listener, the reloader, the
/// acceptor and the stream tasks (each bounded by [`CONNECTIONS_GRACE`]).
pub(super) async fn shut_down(
    listening: Listening,
    shared: &Shared,
    idle: &mut Idle,
    engine: Option<&mut Engine>,
) {
    let Listening {
        endpoint,
        acceptor,
        stop_tcp,
        reloader,
    } = listening;
    // Answers already decided reach their sites before the connections
    // close (bounded: a site that stopped reading must not hold shutdown).
    shared.answers.close();
    wait_bounded(
        shared.answers.wait(),
        limits::ANSWER_GRACE,
        "upload answers still unacknowledged",
        "the end; closing anyway",
    )
    .await;
    idle.close_all();
    if let Some(e) = engine {
        e.close_all();
    }
    endpoint.close(
        fedlink_transport::close::SHUTDOWN,
        b"coordinator shutting down",
    );
    stop_tcp.notify_one();
    reloader.abort();
    // The closed endpoint ends the acceptor's loop; it then waits for the
    // connection tasks to record their ends. Bounded: a task stuck on a
    // full disk must not hold the shutdown.
    let acceptor_abort = acceptor.abort_handle();
    if !wait_bounded(
        acceptor,
        CONNECTIONS_GRACE,
        "connection tasks still running",
        "shutdown; not waiting for them",
    )
    .await
    {
        acceptor_abort.abort();
    }
    // The reloader and every stream task hold `shared` (and through it the
    // store): wait until they are gone, bounded like the connections.
    let _ = reloader.await;
    shared.tasks.close();
    wait_bounded(
        shared.tasks.wait(),
        CONNECTIONS_GRACE,
        "stream tasks still running",
        "shutdown; not waiting for them",
    )
    .await;
    // Failed handshakes still counted are recorded before the coordinator
    // stops.
    shared.record_refusals(true);
    // Give quinn a moment to send the close frames.
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// Shutdown's bounded wait: `wait` for at most `grace`; past it, warn
/// "`still` `grace` s after `after`" and return `false` (the caller decides
/// whether to abort what it waited for).
async fn wait_bounded(wait: impl Future, grace: Duration, still: &str, after: &str) -> bool {
    let done = tokio::time::timeout(grace, wait).await.is_ok();
    if !done {
        tracing::warn!("{still} {} s after {after}", grace.as_secs());
    }
    done
}
