//! Running a flow: its steps in order, each rendered from the variables so
//! far, sent, judged by its status mapping, and its values extracted.

use lethe_connector::{ConnectorError, StillWanted};
use reqwest::header::{HeaderName, HeaderValue};
use serde_json::Value;

use crate::client::{Body, Client, Request};
use crate::spec::Step;
use crate::template::{self, render_json, Escape, RenderError, Template, Vars};

/// How a flow ended.
#[derive(Debug)]
pub enum Run {
    /// A step said the subject is not there (`not_found`, or an empty
    /// `found`): nothing was done.
    NotFound,
    /// Every step succeeded.
    Done {
        /// The variables, with every extracted value.
        vars: Vars,
        /// What the last step with a `count` counted.
        count: Option<u64>,
        /// The last response's body; `None` when it was not JSON.
        last: Option<Value>,
    },
    /// A check between two steps found the attempt withdrawn (a legal
    /// hold, or a newer attempt): the steps before it were done, the rest
    /// were not.
    Stopped,
}

/// A successful answer whose body a step must read is not JSON (an HTML
/// page from a proxy or a login wall, say): retryable, as such pages
/// usually pass, and never "nothing found".
pub fn not_json(step: &str, status: u16) -> ConnectorError {
    ConnectorError::retryable(format!("step {step:?}: the response (HTTP {status}) is not JSON"))
}

/// A successful answer without a body (or a bare `null`) where a step
/// must read one: a proxy or a gateway answering for the API, not the API
/// saying the subject is not there. Retryable, never "nothing found".
pub fn no_body(step: &str, status: u16) -> ConnectorError {
    ConnectorError::retryable(format!("step {step:?}: the response (HTTP {status}) has no body to read"))
}

fn render_error(step: &str, e: RenderError) -> ConnectorError {
    ConnectorError::permanent(format!("step {step:?}: {e}"))
}

/// Renders one template; templates were checked when the spec was loaded.
fn render(step: &str, source: &str, vars: &Vars, escape: Escape) -> Result<String, ConnectorError> {
    let t = Template::parse(source).map_err(|e| ConnectorError::permanent(format!("step {step:?}: {e}")))?;
    t.render(vars, escape).map_err(|e| render_error(step, e))
}

/// Builds the request of `step` from `vars`.
pub fn request(step: &Step, vars: &Vars) -> Result<Request, ConnectorError> {
    let name = step.name.as_str();
    let path = render(name, &step.path, vars, Escape::PathSegment)?;
    let query = step
        .query
        .iter()
        .map(|(k, v)| Ok((k.clone(), render(name, v, vars, Escape::None)?)))
        .collect::<Result<_, ConnectorError>>()?;
    let headers = step
        .headers
        .iter()
        .map(|(k, v)| header(name, k, &render(name, v, vars, Escape::None)?))
        .collect::<Result<_, _>>()?;
    let body = match (&step.body, &step.form) {
        (Some(json), _) => {
            let value = render_json(json, vars).map_err(|e| render_error(name, e))?;
            // Serialising a JSON value cannot fail.
            Some(Body::Json(serde_json::to_vec(&value).unwrap_or_default()))
        }
        (None, Some(form)) => Some(Body::Form(
            form.iter()
                .map(|(k, v)| Ok((k.clone(), render(name, v, vars, Escape::None)?)))
                .collect::<Result<_, ConnectorError>>()?,
        )),
        (None, None) => None,
    };
    Ok(Request { step: step.name.clone(), method: step.method.as_reqwest(), path, query, headers, body })
}

/// A header from a rendered value; control characters are refused.
pub fn header(step: &str, name: &str, value: &str) -> Result<(HeaderName, HeaderValue), ConnectorError> {
    let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        ConnectorError::permanent(format!("step {step:?}: {name:?} is not a valid header name"))
    })?;
    let mut v = HeaderValue::from_str(value).map_err(|_| {
        ConnectorError::permanent(format!(
            "step {step:?}: the value of header {name} is not a valid header value"
        ))
    })?;
    v.set_sensitive(true);
    Ok((n, v))
}

/// Runs `steps` in order from `vars`, checking between two steps that the
/// attempt is still `wanted` (lookups, job checks and health checks change
/// nothing and pass [`StillWanted::always`]).
pub async fn run(
    client: &Client,
    steps: &[Step],
    mut vars: Vars,
    wanted: &StillWanted,
) -> Result<Run, ConnectorError> {
    let mut count = None;
    let mut last = Some(Value::Null);
    for (i, step) in steps.iter().enumerate() {
        if i > 0 && !wanted.check().await {
            tracing::info!(
                step = step.name.as_str(),
                "the attempt was withdrawn (a legal hold, or a newer attempt): stopped before the step"
            );
            return Ok(Run::Stopped);
        }
        let name = step.name.as_str();
        let resp = client.send(&request(step, &vars)?).await?;
        if step.not_found.contains(&resp.status) {
            tracing::debug!(step = name, status = resp.status, "the subject is not there");
            return Ok(Run::NotFound);
        }
        if !step.succeeded(resp.status) {
            return Err(crate::error::status(name, resp.status, &step.retry));
        }
        let reads = step.found.is_some() || step.count.is_some() || !step.extract.is_empty();
        if reads && !resp.json {
            return Err(not_json(name, resp.status));
        }
        if reads && resp.body.is_null() {
            return Err(no_body(name, resp.status));
        }
        let select = |pointer: &str| -> Result<Option<Value>, ConnectorError> {
            let p = render(name, pointer, &vars, Escape::Pointer)?;
            Ok(template::select(&resp.body, &p))
        };
        if let Some(found) = &step.found {
            if template::is_empty(select(found)?.as_ref()) {
                tracing::debug!(step = name, "the subject is not there (nothing found)");
                return Ok(Run::NotFound);
            }
        }
        if let Some(pointer) = &step.count {
            count = Some(template::count(select(pointer)?.as_ref()));
        }
        let mut extracted = Vec::with_capacity(step.extract.len());
        for (var, pointer) in &step.extract {
            let value = select(pointer)?.filter(|v| !v.is_null()).ok_or_else(|| {
                ConnectorError::permanent(format!(
                    "step {name:?}: the response (HTTP {}) has nothing at {pointer:?}",
                    resp.status
                ))
            })?;
            extracted.push((var.clone(), value));
        }
        for (var, value) in extracted {
            vars.set(var, value);
        }
        last = resp.json.then_some(resp.body);
    }
    Ok(Run::Done { vars, count, last })
}
