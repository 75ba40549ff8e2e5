//! The dashboard at `/` on the API port: a static page (HTML, CSS, JS, an icon) compiled into
//! the binary, so it needs no CDN, no build step and no files on the host. The page holds no
//! data (its script reads the JSON routes with the person's API key), so it is served outside
//! the gateway: no key, no rate limit, no place in the engine's admission. A strict
//! Content-Security-Policy allows only this origin's own files (no inline script or style, no
//! framing); responses carry an ETag and must be revalidated, so an upgraded agent's page is
//! never mixed with an old script.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

/// One embedded file and the path it is served at.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../../assets/dashboard/index.html"),
    },
    Asset {
        path: "/dashboard/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../assets/dashboard/app.js"),
    },
    Asset {
        path: "/dashboard/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../assets/dashboard/style.css"),
    },
    Asset {
        path: "/dashboard/favicon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../../assets/dashboard/favicon.svg"),
    },
];

/// Only this origin's files; `connect-src 'self'` is what lets the script call the API.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       connect-src 'self'; object-src 'none'; base-uri 'none'; \
                       form-action 'none'; frame-ancestors 'none'";

/// The dashboard's routes, merged into the API's router beside (not behind) the gateway.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    ASSETS.iter().fold(Router::new(), |router, asset| {
        let etag = etag(asset.body);
        router.route(
            asset.path,
            get(move |headers: HeaderMap| async move { respond(asset, &etag, &headers) }),
        )
    })
}

/// A strong validator from the content: the same bytes always have the same tag.
fn etag(body: &[u8]) -> HeaderValue {
    let digest = Sha256::digest(body);
    let tag = format!("\"{}\"", hex::encode(&digest[..12]));
    HeaderValue::from_str(&tag).unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

/// Whether an `If-None-Match` header names `etag` (or is `*`).
fn matches(if_none_match: Option<&HeaderValue>, etag: &HeaderValue) -> bool {
    let Some(Ok(list)) = if_none_match.map(|v| v.to_str()) else {
        return false;
    };
    let want = etag.to_str().unwrap_or_default();
    list.split(',').map(str::trim).any(|t| {
        let t = t.strip_prefix("W/").unwrap_or(t);
        t == "*" || t == want
    })
}

fn respond(asset: &Asset, etag: &HeaderValue, headers: &HeaderMap) -> Response {
    let fresh = matches(headers.get(header::IF_NONE_MATCH), etag);
    let mut r = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.body,
        )
            .into_response()
    };
    let h = r.headers_mut();
    h.insert(header::ETAG, etag.clone());
    // Cached, but revalidated on every load (a 304 costs a few bytes).
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    async fn get(path: &str, if_none_match: Option<&str>) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut req = axum::http::Request::builder().uri(path);
        if let Some(tag) = if_none_match {
            req = req.header("if-none-match", tag);
        }
        let resp = routes::<()>()
            .oneshot(req.body(Body::empty()).expect("request"))
            .await
            .expect("response");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        (status, headers, body.to_vec())
    }

    fn html() -> &'static str {
        std::str::from_utf8(ASSETS[0].body).expect("index.html is UTF-8")
    }

    #[tokio::test]
    async fn every_asset_is_served_with_its_type_the_policy_and_a_validator() {
        for a in ASSETS {
            let (status, headers, body) = get(a.path, None).await;
            assert_eq!(status, StatusCode::OK, "{}", a.path);
            assert_eq!(body, a.body, "{}", a.path);
            assert_eq!(headers["content-type"], a.content_type);
            assert_eq!(headers["content-security-policy"], CSP);
            assert_eq!(headers["cache-control"], "no-cache");
            assert_eq!(headers["x-content-type-options"], "nosniff");
            let tag = headers["etag"].to_str().expect("etag").to_string();
            let (status, headers, body) = get(a.path, Some(&tag)).await;
            assert_eq!(status, StatusCode::NOT_MODIFIED, "{}", a.path);
            assert!(body.is_empty());
            assert_eq!(headers["etag"], tag.as_str());
            let (status, _, _) = get(a.path, Some("\"other\", W/\"x\"")).await;
            assert_eq!(status, StatusCode::OK, "another tag is not a match");
        }
    }

    /// The policy forbids inline code, so the page must hold none (it would silently not run).
    #[test]
    fn the_page_has_no_inline_script_style_or_handlers() {
        let page = html().to_ascii_lowercase();
        assert!(!CSP.contains("unsafe"), "{CSP}");
        for tag in page.split("<script").skip(1) {
            let head = tag.split('>').next().unwrap_or_default();
            assert!(head.contains("src="), "inline <script{head}>");
            assert!(tag
                .split('>')
                .nth(1)
                .unwrap_or_default()
                .starts_with("</script"));
        }
        assert!(!page.contains("<style"), "inline <style>");
        assert!(!page.contains(" style="), "style attribute");
        assert!(
            !page.contains(" onclick=") && !page.contains(" onload="),
            "handler attribute"
        );
        assert!(!page.contains("javascript:"), "javascript: URL");
    }

    /// Every file the page names is one this module serves, and the other way round.
    #[test]
    fn the_page_names_exactly_the_embedded_files() {
        let page = html();
        let named: Vec<&str> = ["src=\"", "href=\""]
            .iter()
            .flat_map(|attr| page.split(attr).skip(1))
            .filter_map(|rest| rest.split('"').next())
            .filter(|p| p.starts_with('/'))
            .collect();
        for a in &ASSETS[1..] {
            assert!(
                named.contains(&a.path),
                "{} is not used by the page",
                a.path
            );
        }
        for n in &named {
            assert!(
                ASSETS.iter().any(|a| a.path == *n),
                "the page names {n}, which is not embedded"
            );
        }
    }

    /// The script finds its elements by id: each one it names is in the page.
    #[test]
    fn every_element_the_script_uses_is_in_the_page() {
        let script = std::str::from_utf8(ASSETS[1].body).expect("app.js is UTF-8");
        let ids: Vec<&str> = script
            .split("$('")
            .skip(1)
            .filter_map(|rest| rest.split('\'').next())
            .collect();
        assert!(ids.len() > 20, "{ids:?}");
        for id in ids {
            assert!(
                html().contains(&format!("id=\"{id}\"")),
                "app.js uses #{id}, which index.html lacks"
            );
        }
    }

    #[test]
    fn if_none_match_lists_and_wildcards() {
        let tag = etag(b"x");
        let hv = |s: &str| HeaderValue::from_str(s).expect("header");
        assert!(matches(Some(&tag), &tag));
        assert!(matches(Some(&hv("*")), &tag));
        let listed = format!("\"a\", W/{}", tag.to_str().expect("tag"));
        assert!(matches(Some(&hv(&listed)), &tag));
        assert!(!matches(Some(&hv("\"a\"")), &tag));
        assert!(!matches(None, &tag));
    }
}
