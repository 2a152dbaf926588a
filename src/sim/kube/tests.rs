use super::*;
use super::{
    list::{decode_continue, encode_continue},
    selectors::{Filter, parse_field_selector, parse_label_selector},
};

use crate::sim::fixtures::labelled_service as svc;

#[test]
fn label_selectors() {
    let s = svc("a", "x", &[("app", "web"), ("tier", "3")]);
    let ok = |sel: &str| {
        let f = Filter {
            labels: parse_label_selector(sel).unwrap(),
            ..Filter::default()
        };
        f.matches(&s)
    };
    assert!(ok("app=web"));
    assert!(ok("app==web,tier"));
    assert!(ok("app in (web, api),!missing"));
    assert!(ok("app notin (api),tier>2,tier<4"));
    assert!(ok("missing!=x"));
    assert!(!ok("app!=web"));
    assert!(!ok("app in (api)"));
    assert!(parse_label_selector("app=web,").is_err());
    assert!(parse_label_selector("app in ()").is_err());
    assert!(parse_label_selector("a b").is_err());
}

#[test]
fn field_selectors() {
    let s = svc("ns1", "x", &[]);
    let f = |sel: &str| parse_field_selector(sel).map(|r| r.iter().all(|r| r.matches(&s)));
    assert!(f("metadata.name=x,metadata.namespace==ns1").unwrap());
    assert!(f("metadata.name!=y,spec.type=ClusterIP").unwrap());
    assert!(!f("metadata.name=y").unwrap());
    assert_eq!(f("spec.ports=1").err().map(|e| e.code), Some(400));
    assert_eq!(f("nonsense").err().map(|e| e.code), Some(400));
}

#[test]
fn continue_tokens_round_trip_and_reject_garbage() {
    let t = encode_continue(42, "ns/name");
    let (rv, start) = decode_continue(&t).unwrap();
    assert_eq!((rv, start.as_str()), (42, "ns/name"));
    assert_eq!(decode_continue("zz").err().map(|e| e.code), Some(400));
    assert_eq!(
        decode_continue(&hex::encode("{}")).err().map(|e| e.code),
        Some(400)
    );
}

#[test]
fn snapshots_undo_newer_history() {
    let server = FakeApiServer::new();
    server.apply(svc("a", "x", &[]));
    let rv1 = server.resource_version();
    server.apply(svc("a", "y", &[]));
    server.apply(svc("a", "x", &[("v", "2")]));
    server.delete("a", "y");
    let st = lock(&server.inner.store);
    let snap = st.snapshot_at(rv1).unwrap();
    assert_eq!(snap.keys().collect::<Vec<_>>(), ["a/x"]);
    assert!(snap["a/x"].metadata.labels.as_ref().unwrap().is_empty());
    drop(st);
    server.compact();
    let st = lock(&server.inner.store);
    assert_eq!(st.snapshot_at(rv1).err().map(|e| e.code), Some(410));
}
