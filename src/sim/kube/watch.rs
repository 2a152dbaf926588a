//! Watches: history replay, bookmarks, streaming lists and the per-watch event stream.

use super::{
    ApiError, FakeApiServer, Inner, json_line,
    list::{ListOptions, Rv, parse_rv},
    lock,
    selectors::Filter,
    store::{Change, ChangeKind, Store},
    to_value,
};
use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use bytes::Bytes;
use k8s_openapi::api::core::v1::Service;
use serde_json::json;
use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use tokio::sync::{mpsc, oneshot};

/// Per-watch queue. Like the cacher, a watcher that falls this far behind is closed rather than
/// buffered without bound; the client then resumes from its last RV.
const WATCH_QUEUE: usize = 1024;

const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

pub(super) struct WatchSink {
    pub(super) filter: Arc<Filter>,
    pub(super) tx: mpsc::Sender<WatchMsg>,
    pub(super) kill: Option<oneshot::Sender<()>>,
    pub(super) start_rv: u64,
}

pub(super) enum WatchMsg {
    Event {
        rv: u64,
        line: Bytes,
    },
    /// An event the watch's selector filtered out still advances the RV its bookmarks report.
    Progress(u64),
    /// Last line of the stream (the 410 error of `expire_watches`).
    Final(Bytes),
}

fn event_line(kind: &str, svc: &Service) -> Bytes {
    json_line(&json!({"type": kind, "object": to_value(svc)}))
}

fn bookmark_line(rv: u64, initial_events_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({INITIAL_EVENTS_END: "true"});
    }
    json_line(&json!({
        "type": "BOOKMARK",
        "object": {"kind": "Service", "apiVersion": "v1", "metadata": metadata},
    }))
}

pub(super) fn watch_error_line(err: &ApiError) -> Bytes {
    json_line(&json!({"type": "ERROR", "object": err.status()}))
}

/// What one watch sees of a change, following the watch cache: an object entering the selector
/// is ADDED, one leaving it is DELETED (old content, new RV).
pub(super) fn render_change(change: &Change, filter: &Filter) -> Option<Bytes> {
    let cur = change.kind != ChangeKind::Deleted && filter.matches(&change.object);
    let old = change.prev.as_ref().is_some_and(|p| filter.matches(p));
    match (cur, old) {
        (true, false) => Some(event_line("ADDED", &change.object)),
        (true, true) => Some(event_line("MODIFIED", &change.object)),
        (false, true) => {
            let mut gone = change.prev.clone()?;
            gone.metadata.resource_version = Some(change.rv.to_string());
            Some(event_line("DELETED", &gone))
        }
        (false, false) => None,
    }
}

/// What a new watch sends before live events, and the RV it starts at: the synthetic `ADDED` events (and
/// the initial-events-end bookmark) of a streaming list or an RV unset/`0`, else the history replayed
/// after the requested RV; `Err` when that RV is compacted.
fn initial_lines(
    st: &Store,
    opts: &ListOptions,
    rv: Rv,
    filter: &Filter,
) -> Result<(VecDeque<Bytes>, u64), ApiError> {
    let mut pre = VecDeque::new();
    match (opts.send_initial_events, rv) {
        (Some(true), _) | (None, Rv::Unset | Rv::Zero) => {
            for svc in st.objects.values().filter(|s| filter.matches(s)) {
                pre.push_back(event_line("ADDED", svc));
            }
            if opts.send_initial_events == Some(true) && opts.allow_bookmarks {
                pre.push_back(bookmark_line(st.rv, true));
            }
        }
        (Some(false), _) => {}
        (None, Rv::At(n)) => {
            if n < st.oldest_valid {
                return Err(ApiError::too_old(n, st.oldest_valid));
            }
            for c in st.history.iter().filter(|c| c.rv > n) {
                if let Some(line) = render_change(c, filter) {
                    pre.push_back(line);
                }
            }
        }
    }
    Ok((pre, st.rv))
}

pub(super) async fn start_watch(
    server: &FakeApiServer,
    filter: Filter,
    opts: &ListOptions,
) -> Result<Response, ApiError> {
    let rv = parse_rv(opts.resource_version.as_deref())?;
    if let Rv::At(n) = rv {
        server.wait_for_rv(n).await?;
    }
    let filter = Arc::new(filter);
    let (tx, rx) = mpsc::channel(WATCH_QUEUE);
    let (kill_tx, kill_rx) = oneshot::channel();

    let mut st = lock(&server.inner.store);
    let (pre, start_rv) = match initial_lines(&st, opts, rv, &filter) {
        Ok(initial) => initial,
        Err(err) => {
            drop(st);
            let body =
                futures::stream::once(
                    async move { Ok::<_, std::io::Error>(watch_error_line(&err)) },
                );
            return Ok(watch_response(Body::from_stream(body)));
        }
    };
    st.next_watch_id += 1;
    let id = st.next_watch_id;
    st.watches.insert(
        id,
        WatchSink {
            filter,
            tx,
            kill: Some(kill_tx),
            start_rv: match rv {
                Rv::At(n) => n,
                _ => start_rv,
            },
        },
    );
    let bookmark_interval = st.bookmark_interval;
    drop(st);

    let bookmarks = opts.allow_bookmarks.then(|| {
        let mut i = tokio::time::interval_at(
            tokio::time::Instant::now() + bookmark_interval,
            bookmark_interval,
        );
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let stream = WatchStream {
        pre,
        rx,
        kill: Some(kill_rx),
        // `timeoutSeconds` is client input; one too large to represent means no deadline.
        deadline: opts
            .timeout
            .and_then(|t| tokio::time::Instant::now().checked_add(t)),
        bookmarks,
        progress: start_rv,
        finished: false,
        _guard: WatchGuard {
            inner: Arc::downgrade(&server.inner),
            id,
        },
    };
    let body = futures::stream::unfold(stream, |mut s| async move {
        let item = s.next_item().await?;
        Some((item, s))
    });
    Ok(watch_response(Body::from_stream(body)))
}

pub(super) fn watch_response(body: Body) -> Response {
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    resp
}

/// Deregisters the watch when hyper drops the body (client went away or stream ended).
struct WatchGuard {
    inner: Weak<Inner>,
    id: u64,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            lock(&inner.store).watches.remove(&self.id);
        }
    }
}

struct WatchStream {
    pre: VecDeque<Bytes>,
    rx: mpsc::Receiver<WatchMsg>,
    kill: Option<oneshot::Receiver<()>>,
    deadline: Option<tokio::time::Instant>,
    bookmarks: Option<tokio::time::Interval>,
    /// Newest RV this watch has caught up with; what its bookmarks report.
    progress: u64,
    finished: bool,
    _guard: WatchGuard,
}

enum Wake {
    Killed,
    KillGone,
    Timeout,
    Msg(Option<WatchMsg>),
    Bookmark,
}

impl WatchStream {
    async fn next_item(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        if self.finished {
            return None;
        }
        if let Some(line) = self.pre.pop_front() {
            return Some(Ok(line));
        }
        loop {
            let wake = {
                let Self {
                    rx,
                    kill,
                    deadline,
                    bookmarks,
                    ..
                } = self;
                tokio::select! {
                    biased;
                    r = async {
                        match kill.as_mut() {
                            Some(k) => k.await,
                            None => std::future::pending().await,
                        }
                    } => if r.is_ok() { Wake::Killed } else { Wake::KillGone },
                    () = async {
                        match deadline {
                            Some(d) => tokio::time::sleep_until(*d).await,
                            None => std::future::pending().await,
                        }
                    } => Wake::Timeout,
                    m = rx.recv() => Wake::Msg(m),
                    () = async {
                        match bookmarks.as_mut() {
                            Some(i) => { i.tick().await; }
                            None => std::future::pending::<()>().await,
                        }
                    } => Wake::Bookmark,
                }
            };
            match wake {
                Wake::Killed => {
                    self.finished = true;
                    // An error makes hyper drop the connection without the final chunk, which is
                    // what a client sees when the apiserver goes away mid-watch.
                    return Some(Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "watch dropped by fake apiserver",
                    )));
                }
                Wake::KillGone => self.kill = None,
                Wake::Timeout | Wake::Msg(None) => return None,
                Wake::Msg(Some(WatchMsg::Event { rv, line })) => {
                    self.progress = rv;
                    return Some(Ok(line));
                }
                Wake::Msg(Some(WatchMsg::Progress(rv))) => self.progress = rv,
                Wake::Msg(Some(WatchMsg::Final(line))) => {
                    self.finished = true;
                    return Some(Ok(line));
                }
                Wake::Bookmark => return Some(Ok(bookmark_line(self.progress, false))),
            }
        }
    }
}
