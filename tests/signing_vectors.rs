//! One test per case of the official SDK's signing vectors; every stage is checked byte for byte.

use elb_exporter::signer::{Algorithm, SignRequest, sign};
use serde_json::Value;

fn case(name: &str) -> Value {
    let all: Vec<Value> =
        serde_json::from_str(include_str!("data/signing_vectors.json")).expect("vectors parse");
    all.into_iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no vector named {name}"))
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn check(name: &str) {
    let v = case(name);
    let query: Vec<(String, String)> = v["query"]
        .as_array()
        .expect("query")
        .iter()
        .map(|p| (scalar(&p[0]), scalar(&p[1])))
        .collect();
    let headers: Vec<(String, String)> = v["headers"]
        .as_object()
        .expect("headers")
        .iter()
        .map(|(k, val)| (k.clone(), scalar(val)))
        .collect();
    let algorithm = match v["algorithm"].as_str() {
        Some("SDK-HMAC-SHA256") => Algorithm::SdkHmacSha256,
        Some("V11-HMAC-SHA256") => Algorithm::V11HmacSha256 {
            region: scalar(&v["region_id"]),
            service: scalar(&v["derived_auth_service_name"]),
        },
        other => panic!("unexpected algorithm {other:?}"),
    };
    let body = scalar(&v["body"]);
    let req = SignRequest {
        method: v["method"].as_str().unwrap(),
        host: v["host"].as_str().unwrap(),
        path: v["path"].as_str().unwrap(),
        query: &query,
        headers: &headers,
        body: body.as_bytes(),
    };
    let s = sign(
        &req,
        v["ak"].as_str().unwrap(),
        v["sk"].as_str().unwrap(),
        &algorithm,
    );

    assert_eq!(
        s.canonical_request,
        scalar(&v["canonical_request"]),
        "canonical request"
    );
    assert_eq!(
        s.string_to_sign,
        scalar(&v["string_to_sign"]),
        "string to sign"
    );
    assert_eq!(s.signature, scalar(&v["signature"]), "signature");
    assert_eq!(
        s.signed_headers,
        scalar(&v["expected_signed_headers"]),
        "signed headers"
    );
    assert_eq!(
        s.authorization,
        scalar(&v["expected_authorization"]),
        "authorization"
    );

    // The wire request must be exactly what was signed.
    let mut url = format!("https://{}{}", req.host, req.path);
    if !s.query_string.is_empty() {
        url.push('?');
        url.push_str(&s.query_string);
    }
    assert_eq!(url, scalar(&v["url"]), "wire url");
    let mut sent: Vec<(String, String)> = s.headers.clone();
    let mut want: Vec<(String, String)> = v["signed_request_headers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, val)| (k.clone(), scalar(val)))
        .collect();
    sent.sort();
    want.sort();
    assert_eq!(sent, want, "headers on the wire");
}

macro_rules! vectors {
    ($($name:ident),* $(,)?) => { $( #[test] fn $name() { check(stringify!($name)); } )* };
}

vectors!(
    doc_example_vpcs_get,
    get_no_query_minimal_headers,
    path_with_trailing_slash,
    query_space_and_slash,
    query_empty_value,
    query_repeated_keys_sorted_by_value,
    post_json_body,
    header_values_with_spaces,
    credentials_security_token_header,
    iam_list_projects_minimal,
    elb_v3_list_listeners_minimal,
    ces_batch_query_minimal,
    derived_ces_batch_query,
);

/// Every vector in the file has a test above: a case added to the data cannot go unchecked.
#[test]
fn every_vector_has_a_test() {
    let all: Vec<Value> = serde_json::from_str(include_str!("data/signing_vectors.json")).unwrap();
    let listed = include_str!("signing_vectors.rs");
    for v in all {
        let name = v["name"].as_str().unwrap();
        assert!(
            listed.contains(&format!("    {name},\n")),
            "vector {name} has no test"
        );
    }
}
