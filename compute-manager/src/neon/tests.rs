//! The pageserver client against the fake pageserver, which checks every request against the
//! published spec's shapes: each test ends by asserting that none deviated.

use std::time::Duration;

use serde_json::json;

use super::fake_pageserver::{FakePageserver, Fault, Op};
use super::*;
use crate::kubernetes::NeonConfig;

const TENANT: &str = "de200bd42b49cc1814412c7e592dd6e9";
const MAIN: &str = "0d8f5a0e5c2b1e4f8f6a3b2c1d0e9f8a";
const HEAD: &str = "0/16B5A50";

struct Setup {
    fake: FakePageserver,
    client: PageserverClient,
    tenant: TenantId,
    main: TimelineId,
}

fn config(url: String) -> NeonConfig {
    NeonConfig {
        request_timeout: Duration::from_secs(5),
        retries: 3,
        retry_backoff: Duration::from_millis(5),
        delete_wait: Duration::from_secs(5),
        ..NeonConfig::new(url)
    }
}

async fn setup() -> Setup {
    let fake = FakePageserver::start().await;
    let (tenant, main) = (
        TenantId::parse(TENANT).unwrap(),
        TimelineId::parse(MAIN).unwrap(),
    );
    fake.add_tenant(tenant, main, Lsn::parse(HEAD).unwrap());
    let client = PageserverClient::new(&config(fake.url())).unwrap();
    Setup {
        fake,
        client,
        tenant,
        main,
    }
}

impl Setup {
    fn branch(&self, lsn: Option<&str>) -> BranchRequest {
        BranchRequest {
            tenant: self.tenant,
            new_timeline_id: TimelineId::generate(),
            ancestor_timeline_id: self.main,
            ancestor_start_lsn: lsn.map(|l| Lsn::parse(l).unwrap()),
            pg_version: None,
        }
    }

    fn no_violations(&self) {
        assert_eq!(self.fake.violations(), Vec::<String>::new());
    }
}

#[tokio::test]
async fn branch_at_head_sends_exactly_the_spec_fields() {
    let s = setup().await;
    let req = BranchRequest {
        pg_version: Some(16),
        ..s.branch(None)
    };
    let info = s.client.create_branch(&req).await.unwrap();
    assert_eq!(info.timeline_id, req.new_timeline_id);
    assert_eq!(info.ancestor_timeline_id, Some(s.main));
    assert_eq!(info.ancestor_lsn, Some(Lsn::parse(HEAD).unwrap()));
    let made = s.fake.timeline(s.tenant, req.new_timeline_id).unwrap();
    assert_eq!(made.ancestor, Some((s.main, Lsn::parse(HEAD).unwrap())));

    let received = s.fake.received();
    let paths: Vec<String> = received
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        paths,
        [
            format!("GET /v1/tenant/{TENANT}/timeline/{MAIN}"),
            format!("POST /v1/tenant/{TENANT}/timeline"),
        ]
    );
    assert_eq!(
        received[1].body,
        Some(json!({
            "new_timeline_id": req.new_timeline_id.to_string(),
            "ancestor_timeline_id": MAIN,
            "pg_version": 16,
        }))
    );
    assert!(received.iter().all(|r| r.authorization.is_none()));
    s.no_violations();
}

#[tokio::test]
async fn branch_at_an_lsn_sends_it_in_x_slash_y_form() {
    let s = setup().await;
    s.fake
        .advance(s.tenant, s.main, Lsn::parse("0/3000000").unwrap());
    let req = s.branch(Some("0/2000001"));
    let info = s.client.create_branch(&req).await.unwrap();
    // The pageserver aligns the branch point to 8 bytes.
    assert_eq!(info.ancestor_lsn, Some(Lsn::parse("0/2000008").unwrap()));
    let post = s.fake.received().pop().unwrap();
    assert_eq!(post.body.unwrap()["ancestor_start_lsn"], "0/2000001");
    s.no_violations();
}

#[tokio::test]
async fn an_lsn_the_parent_has_not_reached_is_the_callers_mistake() {
    let s = setup().await;
    let e = s
        .client
        .create_branch(&s.branch(Some("1/0")))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), PageserverErrorKind::BadLsn, "{e}");
    assert_eq!(e.kind().source(), crate::ErrorSource::Client);
    assert!(!e.retryable());
    assert_eq!(s.fake.count(Op::Create), 1, "406 is not retried");
    assert_eq!(s.fake.timeline_count(), 1);
    s.no_violations();
}

#[tokio::test]
async fn an_unknown_ancestor_is_a_client_error_and_nothing_is_created() {
    let s = setup().await;
    let req = BranchRequest {
        ancestor_timeline_id: TimelineId::generate(),
        ..s.branch(None)
    };
    let e = s.client.create_branch(&req).await.unwrap_err();
    assert_eq!(e.kind(), PageserverErrorKind::NotFound, "{e}");
    assert_eq!(e.kind().source(), crate::ErrorSource::Client);
    // Neither ids nor the pageserver's words reach the client.
    assert!(!e.client_message().contains(TENANT));
    assert_eq!(s.fake.count(Op::Create), 0);
    // An unknown tenant as well.
    let req = BranchRequest {
        tenant: TenantId::generate(),
        ..s.branch(None)
    };
    let e = s.client.create_branch(&req).await.unwrap_err();
    assert_eq!(e.kind(), PageserverErrorKind::NotFound, "{e}");
    assert_eq!(s.fake.timeline_count(), 1);
    s.no_violations();
}

#[tokio::test]
async fn unavailable_once_then_created_once_with_the_same_id() {
    let s = setup().await;
    s.fake.fail_next(Op::Create, Fault::Status(503));
    s.fake.fail_next(Op::Create, Fault::Status(429));
    let req = s.branch(None);
    s.client.create_branch(&req).await.unwrap();
    let posts: Vec<_> = s
        .fake
        .received()
        .into_iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.body.unwrap())
        .collect();
    assert_eq!(posts.len(), 3);
    assert!(posts.iter().all(|b| *b == posts[0]), "{posts:?}");
    assert_eq!(s.fake.timeline_count(), 2, "exactly one timeline created");
    s.no_violations();
}

#[tokio::test]
async fn a_lost_answer_at_the_head_of_a_parent_being_written_is_still_success() {
    let s = setup().await;
    // The first try creates the timeline but its answer is lost; by the retry the parent's
    // head has moved, so the pageserver's idempotency check answers 409.
    s.fake.keep_writing(s.tenant, s.main);
    s.fake.fail_next(Op::Create, Fault::AfterDone(503));
    let req = s.branch(None);
    let info = s.client.create_branch(&req).await.unwrap();
    assert_eq!(info.timeline_id, req.new_timeline_id);
    assert_eq!(s.fake.count(Op::Create), 2);
    assert_eq!(s.fake.timeline_count(), 2);
    s.no_violations();
}

#[tokio::test]
async fn an_id_taken_with_other_parameters_is_a_conflict() {
    let s = setup().await;
    s.fake
        .advance(s.tenant, s.main, Lsn::parse("0/3000000").unwrap());
    let first = s.branch(Some("0/2000000"));
    s.client.create_branch(&first).await.unwrap();
    // The same request again: idempotent.
    s.client.create_branch(&first).await.unwrap();
    let other = BranchRequest {
        ancestor_start_lsn: Some(Lsn::parse("0/2800000").unwrap()),
        ..first.clone()
    };
    let e = s.client.create_branch(&other).await.unwrap_err();
    assert_eq!(e.kind(), PageserverErrorKind::Conflict, "{e}");
    assert_eq!(s.fake.timeline_count(), 2);
    s.no_violations();
}

#[tokio::test]
async fn unavailable_on_every_try_gives_up_retryable() {
    let s = setup().await;
    for _ in 0..4 {
        s.fake.fail_next(Op::Create, Fault::Status(503));
    }
    let e = s.client.create_branch(&s.branch(None)).await.unwrap_err();
    assert_eq!(e.kind(), PageserverErrorKind::Unavailable, "{e}");
    assert!(e.retryable());
    assert_eq!(s.fake.count(Op::Create), 4, "retries = 3");
    assert_eq!(
        e.client_message(),
        "storage is unavailable; try again later"
    );
    s.no_violations();
}

#[tokio::test]
async fn a_call_that_hangs_times_out_and_is_retried() {
    let fake = FakePageserver::start().await;
    let (tenant, main) = (TenantId::generate(), TimelineId::generate());
    fake.add_tenant(tenant, main, Lsn::parse(HEAD).unwrap());
    let client = PageserverClient::new(&NeonConfig {
        request_timeout: Duration::from_millis(300),
        ..config(fake.url())
    })
    .unwrap();
    fake.fail_next(Op::Create, Fault::Hang);
    let req = BranchRequest {
        tenant,
        new_timeline_id: TimelineId::generate(),
        ancestor_timeline_id: main,
        ancestor_start_lsn: None,
        pg_version: None,
    };
    client.create_branch(&req).await.unwrap();
    assert_eq!(fake.count(Op::Create), 2);
    assert_eq!(fake.timeline_count(), 2);
    assert!(fake.violations().is_empty(), "{:?}", fake.violations());
}

#[tokio::test]
async fn the_lsn_0_0_is_refused_before_any_request() {
    let s = setup().await;
    // `Lsn::parse` refuses malformed and zero LSNs; the only way to hold 0/0 is to read it
    // from the pageserver, and the client refuses it as a branch point too.
    for bad in ["16/zz", "0/0", "16", ""] {
        assert!(Lsn::parse(bad).is_err(), "{bad}");
    }
    let zero: Lsn = serde_json::from_value(json!("0/0")).unwrap();
    let req = BranchRequest {
        ancestor_start_lsn: Some(zero),
        ..s.branch(None)
    };
    let e = s.client.create_branch(&req).await.unwrap_err();
    assert_eq!(e.kind(), PageserverErrorKind::BadLsn);
    assert!(s.fake.received().is_empty());
}

#[tokio::test]
async fn delete_polls_until_gone_and_refuses_a_timeline_with_branches() {
    let s = setup().await;
    let req = s.branch(None);
    s.client.create_branch(&req).await.unwrap();

    let e = s
        .client
        .delete_timeline(s.tenant, s.main)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), PageserverErrorKind::HasChildren, "{e}");
    assert_eq!(e.kind().source(), crate::ErrorSource::Client);

    s.fake.fail_next(Op::Delete, Fault::Status(500));
    s.client
        .delete_timeline(s.tenant, req.new_timeline_id)
        .await
        .unwrap();
    assert!(s.fake.timeline(s.tenant, req.new_timeline_id).is_none());
    // 412, then 500 (retried as the spec says), 202 (accepted), 404 (done).
    assert_eq!(s.fake.count(Op::Delete), 4);
    // Deleting what is gone succeeds.
    s.client
        .delete_timeline(s.tenant, req.new_timeline_id)
        .await
        .unwrap();
    s.no_violations();
}

#[tokio::test]
async fn the_token_is_sent_as_a_bearer_and_a_refusal_is_not_retried() {
    let s = setup().await;
    s.fake.require_token("eyJhbGciOiJFZERTQSJ9.e30.c2ln");
    let e = s.client.timeline(s.tenant, s.main).await.unwrap_err();
    assert_eq!(e.kind(), PageserverErrorKind::Unauthorized, "{e}");
    assert_eq!(s.fake.count(Op::Get), 1);

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "eyJhbGciOiJFZERTQSJ9.e30.c2ln\n").unwrap();
    let client = PageserverClient::new(&NeonConfig {
        pageserver_token_file: Some(token_file.clone()),
        ..config(s.fake.url())
    })
    .unwrap();
    client.create_branch(&s.branch(None)).await.unwrap();
    let last = s.fake.received().pop().unwrap();
    assert_eq!(
        last.authorization.as_deref(),
        Some("Bearer eyJhbGciOiJFZERTQSJ9.e30.c2ln")
    );
    // A token file that went missing is an internal error, not a request without a token.
    std::fs::remove_file(&token_file).unwrap();
    let before = s.fake.received().len();
    let e = client.timeline(s.tenant, s.main).await.unwrap_err();
    assert_eq!(e.kind(), PageserverErrorKind::Internal, "{e}");
    assert!(!e.client_message().contains("token"));
    assert_eq!(s.fake.received().len(), before);
    s.no_violations();
}

#[tokio::test]
async fn the_fake_flags_requests_that_differ_from_the_spec() {
    let s = setup().await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/tenant/{TENANT}/timeline", s.fake.url());
    for body in [
        json!({ "ancestor_timeline_id": MAIN }),
        json!({ "new_timeline_id": "abc", "ancestor_timeline_id": MAIN }),
        json!({ "new_timeline_id": MAIN, "ancestor_start_lsn": 5 }),
        json!({ "new_timeline_id": MAIN, "ancestor_lsn": "0/1" }),
    ] {
        let status = http
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 400);
    }
    let status = http
        .get(format!("{}/v1/tenant/{TENANT}/timelines", s.fake.url()))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 404);
    let v = s.fake.violations();
    assert_eq!(v.len(), 5, "{v:?}");
    assert!(v[0].contains("required new_timeline_id"), "{v:?}");
    assert!(v[1].contains("new_timeline_id has a bad value"), "{v:?}");
    assert!(v[2].contains("ancestor_start_lsn has a bad value"), "{v:?}");
    assert!(v[3].contains("unknown field ancestor_lsn"), "{v:?}");
    assert!(v[4].contains("not in the spec"), "{v:?}");
}
