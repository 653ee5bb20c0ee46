use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use postgres_protocol::authentication::sasl::{self as pg, ScramSha256};
use rcgen::{CertificateParams, KeyPair};

use super::keys::{hmac, salted_password};
use super::*;

const PLAIN: &[u8] = b"SCRAM-SHA-256";
const PLUS: &[u8] = b"SCRAM-SHA-256-PLUS";

fn verifier(password: &str) -> Verifier {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
        .parse()
        .unwrap()
}

/// The real client (tokio-postgres's) against our server side.
fn run_pg_client(
    password: &str,
    client_cb: pg::ChannelBinding,
    mechanism: &[u8],
    server: ServerExchange,
) -> Result<Success, ScramError> {
    let mut client = ScramSha256::new(password.as_bytes(), client_cb);
    let first = server.client_first(mechanism, client.message())?;
    client.update(first.message()).unwrap();
    let success = first.client_final(client.message())?;
    client
        .finish(success.server_final.as_bytes())
        .expect("the client accepts our server signature");
    Ok(success)
}

#[test]
fn verifier_roundtrip_and_parameters() {
    let s = postgres_protocol::password::scram_sha_256(b"secret");
    let v: Verifier = s.parse().unwrap();
    assert_eq!(v.iterations(), 4096);
    assert_eq!(v.salt().len(), 16);
    assert_eq!(v.to_string(), s);
    // Debug never shows the keys.
    let dbg = format!("{v:?}");
    assert!(!dbg.contains(&s[s.rfind(':').unwrap() + 1..]), "{dbg}");
}

#[test]
fn malformed_verifiers_are_errors() {
    let good = postgres_protocol::password::scram_sha_256(b"x");
    let (_, keys) = good.rsplit_once('$').unwrap();
    let salt = B64.encode([7u8; 16]);
    let cases: Vec<(String, VerifierError)> = vec![
        ("md5abcdef".into(), VerifierError::NotScram),
        ("".into(), VerifierError::NotScram),
        ("scram-sha-256$4096:x$a:b".into(), VerifierError::NotScram),
        (
            "SCRAM-SHA-256$".into(),
            VerifierError::Malformed("no '$' before the keys"),
        ),
        (
            format!("SCRAM-SHA-256$4096{salt}${keys}"),
            VerifierError::Malformed("no ':' between iterations and salt"),
        ),
        (
            format!("SCRAM-SHA-256$0:{salt}${keys}"),
            VerifierError::Iterations,
        ),
        (
            format!("SCRAM-SHA-256$-1:{salt}${keys}"),
            VerifierError::Iterations,
        ),
        (
            format!("SCRAM-SHA-256$+5:{salt}${keys}"),
            VerifierError::Iterations,
        ),
        (
            format!("SCRAM-SHA-256$1000001:{salt}${keys}"),
            VerifierError::Iterations,
        ),
        (
            format!("SCRAM-SHA-256$99999999999999999999:{salt}${keys}"),
            VerifierError::Iterations,
        ),
        (format!("SCRAM-SHA-256$4096:${keys}"), VerifierError::Salt),
        (
            format!("SCRAM-SHA-256$4096:{}${keys}", "A".repeat(5000)),
            VerifierError::Salt,
        ),
        (
            format!("SCRAM-SHA-256$4096:!!!!${keys}"),
            VerifierError::Malformed("salt is not base64"),
        ),
        (
            format!("SCRAM-SHA-256$4096:{salt}$abc"),
            VerifierError::Malformed("no ':' between the keys"),
        ),
        (
            format!("SCRAM-SHA-256$4096:{salt}$abc:def"),
            VerifierError::Malformed("StoredKey is not 32 bytes of base64"),
        ),
        (
            format!("SCRAM-SHA-256$4096:{salt}${}:x", B64.encode([1u8; 32])),
            VerifierError::Malformed("ServerKey is not 32 bytes of base64"),
        ),
        (
            format!(
                "SCRAM-SHA-256$4096:{salt}${}:{}",
                B64.encode([1u8; 31]),
                B64.encode([1u8; 32])
            ),
            VerifierError::Malformed("StoredKey is not 32 bytes of base64"),
        ),
    ];
    for (s, want) in cases {
        assert_eq!(s.parse::<Verifier>(), Err(want), "{s}");
    }
    // No prefix of a good verifier parses, and none panics.
    for n in 0..good.len() {
        assert!(good[..n].parse::<Verifier>().is_err(), "{}", &good[..n]);
    }
    // The message of an error never echoes the input.
    let e = format!("SCRAM-SHA-256$4096:{salt}$abc:def")
        .parse::<Verifier>()
        .unwrap_err();
    assert!(!e.to_string().contains("abc"));
}

/// RFC 7677 §3: user "user", password "pencil".
#[test]
fn rfc7677_test_vector() {
    let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
    let v = Verifier::from_password("pencil", &salt, 4096);
    let first = ServerExchange::new(v, ChannelBinding::None)
        .client_first_with_nonce(
            PLAIN,
            b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        )
        .unwrap();
    assert_eq!(
        first.message(),
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    );
    let ok = first
        .client_final(
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
              p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        )
        .unwrap();
    assert_eq!(
        ok.server_final,
        "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    );
    let salted = salted_password(b"pencil", &salt, 4096);
    assert_eq!(ok.client_key.as_bytes(), &hmac(&salted, &[b"Client Key"]));
}

#[test]
fn real_client_logs_in_without_channel_binding() {
    for cb in [
        pg::ChannelBinding::unsupported(),
        pg::ChannelBinding::unrequested(),
    ] {
        let ex = ServerExchange::new(verifier("right"), ChannelBinding::None);
        run_pg_client("right", cb, PLAIN, ex).unwrap();
    }
    // Over TLS a client that does not bind at all (`n`) may still use SCRAM-SHA-256.
    let tls = ChannelBinding::TlsServerEndPoint(vec![1; 32]);
    let ex = ServerExchange::new(verifier("right"), tls);
    run_pg_client("right", pg::ChannelBinding::unsupported(), PLAIN, ex).unwrap();
}

#[test]
fn wrong_password_fails_at_the_proof() {
    let ex = ServerExchange::new(verifier("right"), ChannelBinding::None);
    let err = run_pg_client("wrong", pg::ChannelBinding::unsupported(), PLAIN, ex).unwrap_err();
    assert_eq!(err, ScramError::AuthFailed);
    assert_eq!(err.sqlstate(), "28P01");
}

#[test]
fn channel_binding_with_the_proxy_certificate() {
    let cert = cert_with(&rcgen::PKCS_ECDSA_P256_SHA256);
    let cb = tls_server_end_point(&cert).unwrap();
    assert_eq!(
        ChannelBinding::TlsServerEndPoint(cb.clone()).mechanisms()[0],
        Mechanism::ScramSha256Plus
    );
    let ex = ServerExchange::new(
        verifier("pw"),
        ChannelBinding::TlsServerEndPoint(cb.clone()),
    );
    run_pg_client("pw", pg::ChannelBinding::tls_server_end_point(cb), PLUS, ex).unwrap();

    // A man in the middle terminating TLS with another certificate: the client binds to the
    // certificate it saw, which is not ours.
    let theirs = tls_server_end_point(&cert_with(&rcgen::PKCS_ECDSA_P256_SHA256)).unwrap();
    let ours = tls_server_end_point(&cert).unwrap();
    let ex = ServerExchange::new(verifier("pw"), ChannelBinding::TlsServerEndPoint(ours));
    let err = run_pg_client(
        "pw",
        pg::ChannelBinding::tls_server_end_point(theirs),
        PLUS,
        ex,
    )
    .unwrap_err();
    assert!(matches!(err, ScramError::ChannelBinding(_)), "{err:?}");
}

#[test]
fn channel_binding_negotiation_rules() {
    let tls = || ChannelBinding::TlsServerEndPoint(vec![9; 32]);
    let plain = || ChannelBinding::None;
    let v = verifier("pw");
    // PLUS is not offered without TLS.
    assert!(matches!(
        ServerExchange::new(v.clone(), plain())
            .client_first(PLUS, b"p=tls-server-end-point,,n=,r=abc"),
        Err(ScramError::ChannelBinding(_))
    ));
    // `y` over TLS: the client thinks we cannot bind, so someone stripped PLUS (downgrade).
    assert!(matches!(
        ServerExchange::new(v.clone(), tls()).client_first(PLAIN, b"y,,n=,r=abc"),
        Err(ScramError::ChannelBinding(_))
    ));
    // PLUS without binding data, and binding data without PLUS.
    assert!(matches!(
        ServerExchange::new(v.clone(), tls()).client_first(PLUS, b"n,,n=,r=abc"),
        Err(ScramError::ChannelBinding(_))
    ));
    assert!(matches!(
        ServerExchange::new(v.clone(), tls())
            .client_first(PLAIN, b"p=tls-server-end-point,,n=,r=abc"),
        Err(ScramError::ChannelBinding(_))
    ));
    assert!(matches!(
        ServerExchange::new(v.clone(), tls()).client_first(PLUS, b"p=tls-unique,,n=,r=abc"),
        Err(ScramError::ChannelBinding(_))
    ));
    assert!(matches!(
        ServerExchange::new(v.clone(), plain()).client_first(b"PLAIN", b"n,,n=,r=abc"),
        Err(ScramError::ChannelBinding(_))
    ));
    // The c= of the final message must repeat the GS2 header actually sent.
    let first = ServerExchange::new(v, plain())
        .client_first(PLAIN, b"y,,n=,r=abc")
        .unwrap();
    let nonce = std::str::from_utf8(first.message()).unwrap()[2..]
        .split(',')
        .next()
        .unwrap()
        .to_string();
    let proof = B64.encode([0u8; 32]);
    let err = first
        .client_final(format!("c=biws,r={nonce},p={proof}").as_bytes())
        .unwrap_err();
    assert!(matches!(err, ScramError::ChannelBinding(_)), "{err:?}");
}

#[test]
fn malformed_client_messages_are_errors_never_panics() {
    let v = verifier("pw");
    let firsts: &[&[u8]] = &[
        b"",
        b"n",
        b"n,",
        b"x,,n=,r=abc",
        b"n,a=someone,n=,r=abc",
        b"n,,m=ext,n=,r=abc",
        b"n,,r=abc",
        b"n,,n=,",
        b"n,,n=,r=",
        b"n,,n=,r=a b",
        b"n,,n=,r=abc,",
        b"n,,n=,r=abc,=x",
        b"n,,n=,r=\xff",
        b"n,,n=,r=\x01abc",
    ];
    for m in firsts {
        let err = ServerExchange::new(v.clone(), ChannelBinding::None)
            .client_first(PLAIN, m)
            .err();
        assert!(
            matches!(err, Some(ScramError::Malformed(_))),
            "{:?}: {err:?}",
            String::from_utf8_lossy(m)
        );
    }
    assert!(ServerExchange::new(v.clone(), ChannelBinding::None)
        .client_first(PLAIN, b"n,,n=anything at all,r=abc,x=ext")
        .is_ok());
    assert!(matches!(
        ServerExchange::new(v.clone(), ChannelBinding::None).client_first(PLAIN, &[b'n'; 5000]),
        Err(ScramError::Malformed(_))
    ));

    // Every prefix and every byte flip of a real client-final is refused without a panic.
    let mut client = ScramSha256::new(b"pw", pg::ChannelBinding::unsupported());
    let first_msg = client.message().to_vec();
    let start = || {
        ServerExchange::new(v.clone(), ChannelBinding::None)
            .client_first(PLAIN, &first_msg)
            .unwrap()
    };
    let first = start();
    client.update(first.message()).unwrap();
    let fin = client.message().to_vec();
    let server_first = first.message().to_vec();
    let replay = |msg: &[u8]| {
        // Same nonce for each attempt, so only the final message varies.
        let client_nonce_len = first_msg.len() - b"n,,n=,r=".len();
        let full = std::str::from_utf8(&server_first).unwrap()[2..]
            .split(',')
            .next()
            .unwrap();
        let nonce = full[client_nonce_len..].to_string();
        ServerExchange::new(v.clone(), ChannelBinding::None)
            .client_first_with_nonce(PLAIN, &first_msg, &nonce)
            .unwrap()
            .client_final(msg)
    };
    assert!(replay(&fin).is_ok());
    for n in 0..fin.len() {
        assert!(replay(&fin[..n]).is_err(), "prefix {n}");
    }
    for i in 0..fin.len() {
        let mut bad = fin.clone();
        bad[i] ^= 0x01;
        assert!(replay(&bad).is_err(), "flip {i}");
    }
    let mut extra = fin.clone();
    extra.extend_from_slice(b",x=1");
    assert!(matches!(replay(&extra), Err(ScramError::Malformed(_))));
}

#[test]
fn mock_exchange_is_stable_and_fails_like_a_wrong_password() {
    let mock = MockSecret::from_bytes([3; 32]);
    let a = mock.verifier("ep1", "alice");
    assert_eq!(a, mock.verifier("ep1", "alice"));
    assert_ne!(a.salt(), mock.verifier("ep1", "bob").salt());
    assert_ne!(a.salt(), mock.verifier("ep2", "alice").salt());
    assert_ne!(
        a.salt(),
        MockSecret::from_bytes([4; 32])
            .verifier("ep1", "alice")
            .salt()
    );
    // Shaped like PostgreSQL's own verifiers.
    let real = verifier("x");
    assert_eq!(a.iterations(), real.iterations());
    assert_eq!(a.salt().len(), real.salt().len());

    let wrong = run_pg_client(
        "guess",
        pg::ChannelBinding::unsupported(),
        PLAIN,
        ServerExchange::new(real, ChannelBinding::None),
    )
    .unwrap_err();
    for password in ["guess", ""] {
        let err = run_pg_client(
            password,
            pg::ChannelBinding::unsupported(),
            PLAIN,
            mock.exchange("ep1", "alice", ChannelBinding::None),
        )
        .unwrap_err();
        assert_eq!(err, wrong);
    }
    // Even a proof that matches the fake keys (which only someone holding the process secret
    // could compute) is refused.
    let salted = [5u8; 32];
    let mut fake = mock.verifier("ep1", "alice");
    fake.stored_key = keys::sha256(&hmac(&salted, &[b"Client Key"]));
    let ex = ServerExchange::mock(fake.clone(), ChannelBinding::None);
    let first = ex.client_first(PLAIN, b"n,,n=,r=abc").unwrap();
    let server_first = std::str::from_utf8(first.message()).unwrap().to_string();
    let nonce = &server_first[2..server_first.find(',').unwrap()];
    let without_proof = format!("c=biws,r={nonce}");
    let auth = format!("n=,r=abc,{server_first},{without_proof}");
    let client_key = hmac(&salted, &[b"Client Key"]);
    let proof = keys::xor(&client_key, &hmac(&fake.stored_key, &[auth.as_bytes()]));
    let fin = format!("{without_proof},p={}", B64.encode(proof));
    assert_eq!(
        first.client_final(fin.as_bytes()).unwrap_err(),
        ScramError::AuthFailed
    );
}

#[test]
fn proxy_logs_in_to_the_compute_with_the_recovered_client_key() {
    let v = verifier("pw");
    let ok = run_pg_client(
        "pw",
        pg::ChannelBinding::unsupported(),
        PLAIN,
        ServerExchange::new(v.clone(), ChannelBinding::None),
    )
    .unwrap();

    // The compute: our own server side with the same verifier.
    let mut login = ComputeLogin::new(ok.client_key, v.clone());
    let compute = ServerExchange::new(v.clone(), ChannelBinding::None)
        .client_first(PLAIN, &login.client_first())
        .unwrap();
    let fin = login.server_first(compute.message()).unwrap();
    let done = compute.client_final(&fin).unwrap();
    login.server_final(done.server_final.as_bytes()).unwrap();
}

#[test]
fn compute_login_detects_a_changed_password_and_an_impostor() {
    let v = verifier("pw");
    let key = || {
        run_pg_client(
            "pw",
            pg::ChannelBinding::unsupported(),
            PLAIN,
            ServerExchange::new(v.clone(), ChannelBinding::None),
        )
        .unwrap()
        .client_key
    };

    // The password changed at the compute: another salt.
    let mut login = ComputeLogin::new(key(), v.clone());
    let other = ServerExchange::new(verifier("pw"), ChannelBinding::None)
        .client_first(PLAIN, &login.client_first())
        .unwrap();
    assert!(matches!(
        login.server_first(other.message()),
        Err(ScramError::Compute(_))
    ));

    // An impostor copies salt and iterations (they are public) but has no ServerKey.
    let mut impostor_v = v.clone();
    impostor_v.server_key = [0; 32];
    let mut login = ComputeLogin::new(key(), v.clone());
    let first = ServerExchange::new(impostor_v, ChannelBinding::None)
        .client_first(PLAIN, &login.client_first())
        .unwrap();
    let fin = login.server_first(first.message()).unwrap();
    // The impostor's check of our proof passes (it holds the StoredKey); its signature does not.
    let done = first.client_final(&fin).unwrap();
    assert_eq!(
        login.server_final(done.server_final.as_bytes()),
        Err(ScramError::ComputeSignature)
    );

    // A nonce that does not extend ours, garbage, and an `e=` answer.
    let mut login = ComputeLogin::new(key(), v.clone());
    assert!(login.server_first(b"r=zzz,s=AAAA,i=4096").is_err());
    assert!(login.server_first(b"\xff").is_err());
    assert!(login.server_final(b"v=abc").is_err(), "final before first");
    let mut login = ComputeLogin::new(key(), v.clone());
    let first = ServerExchange::new(v.clone(), ChannelBinding::None)
        .client_first(PLAIN, &login.client_first())
        .unwrap();
    login.server_first(first.message()).unwrap();
    assert!(matches!(
        login.server_final(b"e=invalid-proof"),
        Err(ScramError::Compute(_))
    ));
    assert!(login.server_final(b"v=").is_err());
}

#[test]
fn sasl_framing() {
    let mut m = bytes::BytesMut::new();
    sasl::authentication_sasl(
        ChannelBinding::TlsServerEndPoint(vec![]).mechanisms(),
        &mut m,
    );
    assert_eq!(
        &m[..],
        b"R\0\0\0\x2a\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"
    );
    let mechs: Vec<&[u8]> = sasl::parse_mechanisms(&m[9..]).collect();
    assert_eq!(mechs, [PLUS, PLAIN]);

    let mut m = bytes::BytesMut::new();
    sasl::initial_response(Mechanism::ScramSha256, b"n,,n=,r=x", &mut m);
    assert_eq!(m[0], b'p');
    assert_eq!(
        u32::from_be_bytes(m[1..5].try_into().unwrap()) as usize,
        m.len() - 1
    );
    let (mech, data) = sasl::parse_initial_response(&m[5..]).unwrap();
    assert_eq!((mech, data), (PLAIN, &b"n,,n=,r=x"[..]));

    for bad in [
        &b""[..],
        b"SCRAM-SHA-256",
        b"SCRAM-SHA-256\0\0\0",
        b"SCRAM-SHA-256\0\xff\xff\xff\xff",
        b"SCRAM-SHA-256\0\0\0\0\x05abc",
    ] {
        assert!(sasl::parse_initial_response(bad).is_err(), "{bad:?}");
    }
}

fn cert_with(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
    let key = KeyPair::generate_for(alg).unwrap();
    CertificateParams::new(vec!["db.example.com".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap()
        .der()
        .to_vec()
}

#[test]
fn tls_server_end_point_hash_follows_the_certificate_signature() {
    use sha2::{Digest, Sha256, Sha384};
    let p256 = cert_with(&rcgen::PKCS_ECDSA_P256_SHA256);
    assert_eq!(
        tls_server_end_point(&p256).unwrap(),
        Sha256::digest(&p256).to_vec()
    );
    let p384 = cert_with(&rcgen::PKCS_ECDSA_P384_SHA384);
    assert_eq!(
        tls_server_end_point(&p384).unwrap(),
        Sha384::digest(&p384).to_vec()
    );
    let ed = cert_with(&rcgen::PKCS_ED25519);
    assert_eq!(
        tls_server_end_point(&ed),
        Err(ChannelBindingError::UnsupportedSignature)
    );
    for n in 0..p256.len() {
        assert!(tls_server_end_point(&p256[..n]).is_err(), "prefix {n}");
    }
}

#[test]
fn cleartext_password_is_checked_through_scram() {
    let v = verifier("pw");
    let key = verify_password(ServerExchange::new(v.clone(), ChannelBinding::None), b"pw").unwrap();
    let mut login = ComputeLogin::new(key, v.clone());
    let compute = ServerExchange::new(v.clone(), ChannelBinding::None)
        .client_first(PLAIN, &login.client_first())
        .unwrap();
    let fin = login.server_first(compute.message()).unwrap();
    compute.client_final(&fin).unwrap();
    assert_eq!(
        verify_password(ServerExchange::new(v, ChannelBinding::None), b"nope").unwrap_err(),
        ScramError::AuthFailed
    );
    let mock = MockSecret::from_bytes([1; 32]);
    assert_eq!(
        verify_password(mock.exchange("e", "r", ChannelBinding::None), b"pw").unwrap_err(),
        ScramError::AuthFailed
    );
}
