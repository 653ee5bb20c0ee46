//! `pgwake endpoint create|list|delete` and `pgwake branch create`: clients of the management
//! API (`POST/GET/DELETE /v1/endpoints` on `[manager] listen`). The server answers with the
//! connection string, built from its own config (`[api] public_host`, TLS domains), so the
//! CLI needs no more than the API's URL and the token.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use pgwake_compute_manager::provision::{CreateBody, CreatedBody};

use crate::Config;

/// Where the management API is and how to authenticate.
#[derive(Debug, Clone)]
pub struct ApiTarget {
    pub url: String,
    pub token: Option<String>,
}

impl ApiTarget {
    /// `--api` / `--token` (or `PGWAKE_API_TOKEN`) as given, the rest from the config file:
    /// the URL from `[manager] listen`, the token from `[api]`.
    pub fn resolve(
        api: Option<String>,
        token: Option<String>,
        config: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let config = match (&api, &token, config) {
            (Some(_), Some(_), _) | (_, _, None) => None,
            (_, _, Some(path)) => {
                Some(Config::load(path).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))?)
            }
        };
        let url = match api {
            Some(u) => u,
            None => {
                let Some(listen) = config.as_ref().and_then(|c| c.manager.listen) else {
                    bail!("no management API: give --api http://HOST:PORT, or a --config with [manager] listen");
                };
                let host = if listen.ip().is_unspecified() {
                    "127.0.0.1".to_string()
                } else {
                    listen.ip().to_string()
                };
                format!(
                    "http://{}",
                    std::net::SocketAddr::new(host.parse()?, listen.port())
                )
            }
        };
        let token = match token {
            Some(t) => Some(t),
            None => match &config {
                Some(c) => c.api.token().map_err(|e| anyhow::anyhow!("[api]: {e}"))?,
                None => None,
            },
        };
        Ok(Self {
            url: url.trim_end_matches('/').to_string(),
            token,
        })
    }

    fn client(&self) -> anyhow::Result<reqwest::Client> {
        // Copying a large parent takes a while; the server bounds its own waits.
        reqwest::Client::builder()
            .timeout(Duration::from_secs(3600))
            .build()
            .context("HTTP client")
    }

    fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }
}

/// The server's error body, or the raw text of a non-JSON answer.
async fn check(resp: reqwest::Response) -> anyhow::Result<String> {
    let status = resp.status();
    let text = resp.text().await.context("read the answer")?;
    if status.is_success() {
        return Ok(text);
    }
    let detail = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            Some(format!(
                "{} ({})",
                v.get("message")?.as_str()?,
                v.get("kind")?.as_str()?
            ))
        })
        .unwrap_or(text);
    bail!("{status}: {detail}")
}

/// Creates an endpoint (a branch when `body.parent` is set).
pub async fn create(target: &ApiTarget, body: &CreateBody) -> anyhow::Result<CreatedBody> {
    let resp = target
        .auth(
            target
                .client()?
                .post(format!("{}/v1/endpoints", target.url)),
        )
        .json(body)
        .send()
        .await
        .with_context(|| format!("reach the management API at {}", target.url))?;
    let text = check(resp).await?;
    serde_json::from_str(&text).context("unexpected answer from the management API")
}

/// The endpoint list, one line each: id, phase, origin, parent, connection string.
pub async fn list(target: &ApiTarget) -> anyhow::Result<String> {
    let resp = target
        .auth(target.client()?.get(format!("{}/v1/endpoints", target.url)))
        .send()
        .await
        .with_context(|| format!("reach the management API at {}", target.url))?;
    let text = check(resp).await?;
    let all: Vec<serde_json::Value> =
        serde_json::from_str(&text).context("unexpected answer from the management API")?;
    let field = |v: &serde_json::Value, k: &str| {
        v.get(k).and_then(|x| x.as_str()).unwrap_or("-").to_string()
    };
    let mut out = String::from("ID\tPHASE\tORIGIN\tPARENT\tCONNECTION\n");
    for v in &all {
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\n",
            field(v, "endpoint"),
            field(v, "phase"),
            field(v, "origin"),
            field(v, "parent"),
            field(v, "connection_uri"),
        ));
    }
    Ok(out)
}

pub async fn delete(target: &ApiTarget, id: &str, remove_data: bool) -> anyhow::Result<()> {
    let resp = target
        .auth(target.client()?.delete(format!(
            "{}/v1/endpoints/{id}?remove_data={remove_data}",
            target.url
        )))
        .send()
        .await
        .with_context(|| format!("reach the management API at {}", target.url))?;
    check(resp).await?;
    Ok(())
}
