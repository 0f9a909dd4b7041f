//! The answer budget: how many bytes of large answers may be on their way to clients at once.
//!
//! A request's concurrency permit is released when its handler returns, but a slow reader
//! keeps the whole answer in memory until it has taken it. One large set read whole by many
//! slow readers would take the node's memory, so an answer over [`LARGE_ANSWER_BYTES`] holds
//! its size from [`super::App::answer_budget`] until its last bytes leave, and is refused with
//! a 503 when the budget ([`crate::config::Limits::answer_buffer_bytes`]) is full.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::App;
use super::problem::Problem;

/// Answers at least this large hold their size from [`App::answer_budget`] until sent.
const LARGE_ANSWER_BYTES: u64 = 1 << 20;

/// The unit of [`App::answer_budget`]: permits are KiB, so one answer's count fits a `u32`.
const BUDGET_UNIT: usize = 1024;

/// Permits in an answer budget of `bytes` (at least one).
pub fn answer_budget_units(bytes: usize) -> usize {
    bytes.div_ceil(BUDGET_UNIT).clamp(1, Semaphore::MAX_PERMITS)
}

/// Makes a large answer hold its size from the node's budget until its last bytes leave, or
/// refuses it with 503 when slow readers already hold the budget. One answer larger than the
/// whole budget takes all of it, so it is served, alone.
pub(super) async fn hold_answer_budget(app: &App, response: Response) -> Response {
    let Some(len) = HttpBody::size_hint(response.body()).exact() else {
        return response;
    };
    if len < LARGE_ANSWER_BYTES {
        return response;
    }
    let capacity = answer_budget_units(app.limits.answer_buffer_bytes);
    let units = (len as usize).div_ceil(BUDGET_UNIT).min(capacity);
    let permit = u32::try_from(units)
        .ok()
        .and_then(|units| app.answer_budget.clone().try_acquire_many_owned(units).ok());
    let Some(permit) = permit else {
        return Problem::unavailable(
            "answers-backlogged",
            format!(
                "answers larger than 1 MiB already on their way to slow readers fill this \
                 node's {} MiB budget for them ([limits] answer_buffer_bytes); retry shortly",
                app.limits.answer_buffer_bytes >> 20
            ),
            1,
        )
        .into_response();
    };
    let (parts, body) = response.into_parts();
    match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => Response::from_parts(
            parts,
            Body::new(BudgetedBody {
                rest: bytes,
                _permit: permit,
            }),
        ),
        Err(error) => Problem::internal(format!("reading an answer: {error}")).into_response(),
    }
}

/// Bytes of one answer handed to hyper at a time: hyper asks for more only as the client takes
/// them, so the answer, and its permit, live until it is nearly sent, whether hyper queues
/// what it is given (plain TCP) or copies it into its own buffer (TLS).
const ANSWER_SLICE: usize = 64 << 10;

/// A large answer in slices, holding its share of the budget until the last one.
struct BudgetedBody {
    rest: Bytes,
    _permit: OwnedSemaphorePermit,
}

impl HttpBody for BudgetedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.rest.is_empty() {
            return Poll::Ready(None);
        }
        let slice = this.rest.split_to(this.rest.len().min(ANSWER_SLICE));
        Poll::Ready(Some(Ok(Frame::data(slice))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}
