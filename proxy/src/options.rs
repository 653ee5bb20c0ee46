//! Finding the endpoint id in the libpq `options` startup parameter.
//!
//! Clients that cannot send SNI (no TLS, or an old libpq) name their endpoint inside `options`,
//! as `endpoint=ID`, `--endpoint=ID`, `-c endpoint=ID` or `-cendpoint=ID`. Postgres itself would
//! reject an unknown setting named `endpoint`, so those arguments are removed and everything else
//! is handed to the compute with the same meaning.
//!
//! Postgres reads `options` in two steps, and so do we: `pg_split_opts` splits the string into
//! arguments, then `process_postgres_switches` runs `getopt` over them. Following `getopt` is what
//! tells `-c endpoint=x` (ours) from `-d endpoint=x` (a value of `-d`, not ours).

use crate::wire::MAX_STARTUP_LEN;

/// Longest `options` value accepted. It arrives inside a startup packet, so it can never
/// legitimately be longer than one.
pub const MAX_OPTIONS_LEN: usize = MAX_STARTUP_LEN;

/// The setting name is matched exactly (Postgres would fold case, but `Endpoint=` is not one of
/// the documented forms and is passed through for the compute to reject).
const ENDPOINT_PREFIX: &str = "endpoint=";

/// Short options that take a value in `process_postgres_switches`
/// (`"B:bC:c:D:d:EeFf:h:ijk:lN:nOPp:r:S:sTt:v:W:-:"`). `-` is handled separately as `--name=value`.
const SHORT_OPTS_WITH_VALUE: &[char] = &[
    'B', 'C', 'c', 'D', 'd', 'f', 'h', 'k', 'N', 'p', 'r', 'S', 't', 'v', 'W',
];

/// The endpoint found in `options` and what is left for the compute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtractedOptions {
    /// Raw, unvalidated: the caller checks it with `EndpointId::parse`.
    pub endpoint: Option<String>,
    /// `None` when no argument remains, so the caller can drop the parameter entirely.
    pub rest: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionsError {
    #[error("conflicting endpoint values in options")]
    Conflicting,
    #[error("missing value in options: \"-c\" at the end or an empty endpoint")]
    MissingValue,
    #[error("options parameter longer than {max} bytes", max = MAX_OPTIONS_LEN)]
    TooLong,
    #[error("options naming an endpoint must be valid UTF-8")]
    NotUtf8,
}

/// Whether `options` (any bytes) may name an endpoint: contains `endpoint=` anywhere. Options
/// that do not are forwarded without being parsed.
pub fn mentions_endpoint(options: &[u8]) -> bool {
    options
        .windows(ENDPOINT_PREFIX.len())
        .any(|w| w == ENDPOINT_PREFIX.as_bytes())
}

/// Whitespace as C `isspace` sees it in the C locale, which is what `pg_split_opts` uses.
/// Unlike `char::is_ascii_whitespace`, this includes vertical tab.
fn is_pg_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// Splits `options` into arguments exactly as Postgres's `pg_split_opts` does: arguments are
/// separated by unescaped whitespace, and a backslash makes the next character literal.
///
/// A backslash at the very end escapes nothing and yields an empty last argument (`"a \\"` is
/// `["a", ""]`), as in Postgres.
pub fn split_options(s: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|&c| is_pg_space(c)).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut arg = String::new();
        let mut escaped = false;
        while let Some(c) = chars.next_if(|&c| escaped || !is_pg_space(c)) {
            if !escaped && c == '\\' {
                escaped = true;
            } else {
                escaped = false;
                arg.push(c);
            }
        }
        args.push(arg);
    }
    args
}

/// Joins arguments into an `options` string that [`split_options`] splits back into `args`.
///
/// Backslashes and whitespace are escaped. An empty argument can only be written as a trailing
/// lone backslash, so an empty last argument is kept that way and empty arguments elsewhere
/// (which `split_options` never produces) are dropped.
pub fn join_options(args: &[String]) -> String {
    let mut out = String::new();
    let last = args.len().checked_sub(1);
    for (i, arg) in args.iter().enumerate() {
        let is_last = Some(i) == last;
        if arg.is_empty() && !is_last {
            continue;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        if arg.is_empty() {
            out.push('\\');
            continue;
        }
        for c in arg.chars() {
            if c == '\\' || is_pg_space(c) {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out
}

/// Removes the endpoint argument(s) from `options` and returns the endpoint and the rest.
///
/// Recognized forms: `endpoint=ID`, `--endpoint=ID`, `-c endpoint=ID`, `-cendpoint=ID` (also
/// after other flags in one cluster, e.g. `-Ec endpoint=ID`, which leaves `-E`). Giving the same
/// value more than once is fine; different values are [`OptionsError::Conflicting`].
///
/// The rest is re-joined with [`join_options`], so it may be spelled differently from the input
/// (e.g. `\a` becomes `a`) but splits into the same arguments.
pub fn extract_endpoint(options: &str) -> Result<ExtractedOptions, OptionsError> {
    if options.len() > MAX_OPTIONS_LEN {
        return Err(OptionsError::TooLong);
    }
    let args = split_options(options);
    let mut endpoint = None;
    let mut rest: Vec<String> = Vec::with_capacity(args.len());
    // After `--`, getopt treats every argument as an operand.
    let mut operands_only = false;
    let mut i = 0;
    while let Some(arg) = args.get(i) {
        if operands_only || !arg.starts_with('-') || arg == "-" {
            // Postgres rejects any operand, so a bare `endpoint=ID` cannot mean anything else.
            match arg.strip_prefix(ENDPOINT_PREFIX) {
                Some(value) => record(&mut endpoint, value)?,
                None => rest.push(arg.clone()),
            }
            i += 1;
            continue;
        }
        if arg == "--" {
            operands_only = true;
            rest.push(arg.clone());
            i += 1;
            continue;
        }
        if let Some(long) = arg.strip_prefix("--") {
            // `--name=value` is `-c name=value` to Postgres.
            match long.strip_prefix(ENDPOINT_PREFIX) {
                Some(value) => record(&mut endpoint, value)?,
                None => rest.push(arg.clone()),
            }
            i += 1;
            continue;
        }

        // A cluster of short options: flags, then at most one option that takes a value, either
        // the rest of this argument or the whole next one.
        let cluster = &arg[1..];
        let Some((idx, opt)) = cluster
            .char_indices()
            .find(|(_, c)| SHORT_OPTS_WITH_VALUE.contains(c))
        else {
            rest.push(arg.clone());
            i += 1;
            continue;
        };
        let inline = &cluster[idx + opt.len_utf8()..];
        let (value, consumed) = if inline.is_empty() {
            (args.get(i + 1).map(String::as_str), 2)
        } else {
            (Some(inline), 1)
        };
        let endpoint_value = match (opt, value) {
            ('c', None) => return Err(OptionsError::MissingValue),
            ('c', Some(value)) => value.strip_prefix(ENDPOINT_PREFIX),
            // The value of another option is never ours, even if it looks like `endpoint=`.
            _ => None,
        };
        match endpoint_value {
            Some(value) => {
                record(&mut endpoint, value)?;
                // Keep the flags that preceded `c` in the cluster: `-Ec endpoint=x` -> `-E`.
                let flags = &arg[..1 + idx];
                if flags.len() > 1 {
                    rest.push(flags.to_owned());
                }
            }
            None => rest.extend(args.iter().skip(i).take(consumed).cloned()),
        }
        i += consumed;
    }

    Ok(ExtractedOptions {
        endpoint,
        rest: (!rest.is_empty()).then(|| join_options(&rest)),
    })
}

fn record(slot: &mut Option<String>, value: &str) -> Result<(), OptionsError> {
    if value.is_empty() {
        return Err(OptionsError::MissingValue);
    }
    match slot {
        Some(prev) if prev != value => Err(OptionsError::Conflicting),
        Some(_) => Ok(()),
        None => {
            *slot = Some(value.to_owned());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn split_matches_pg_split_opts() {
        let cases: &[(&str, &[&str])] = &[
            ("", &[]),
            ("   \t\n", &[]),
            ("-c a=1", &["-c", "a=1"]),
            ("  -c\ta=1  \n", &["-c", "a=1"]),
            ("\x0b-c\x0ca=1\r", &["-c", "a=1"]),
            (r"a\ b", &["a b"]),
            (r"a\\b", &[r"a\b"]),
            (r"a\\ b", &[r"a\", "b"]),
            (r"\a\b", &["ab"]),
            ("a\\\tb", &["a\tb"]),
            (r"a \", &["a", ""]),
            (r"\", &[""]),
            (r"\\", &[r"\"]),
            (r"\ ", &[" "]),
            ("é\\ ü", &["é ü"]),
        ];
        for (input, want) in cases {
            assert_eq!(split_options(input), strings(want), "input {input:?}");
        }
    }

    #[test]
    fn join_escapes() {
        assert_eq!(
            join_options(&strings(&["-c", "search_path=a b", r"x\y", "t\tn\n"])),
            "-c search_path=a\\ b x\\\\y t\\\tn\\\n"
        );
        assert_eq!(join_options(&strings(&["a", ""])), r"a \");
        assert_eq!(join_options(&strings(&["", "a"])), "a");
        assert_eq!(join_options(&[]), "");
    }

    fn assert_roundtrip(args: &[String]) {
        let joined = join_options(args);
        assert_eq!(&split_options(&joined), args, "joined as {joined:?}");
    }

    #[test]
    fn join_split_roundtrip() {
        let cases: &[&[&str]] = &[
            &[],
            &["-c", "search_path=a b"],
            &[" ", "\t", "\\", "\\\\", " \\ ", "\x0b\x0c\r\n"],
            &["a\\", "b"],
            &["\\"],
            &[""],
            &["a", ""],
            &["é", "日本 語"],
        ];
        for args in cases {
            assert_roundtrip(&strings(args));
        }
    }

    /// Deterministic xorshift so the property test needs no extra dependency and is reproducible.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    const ALPHABET: &[char] = &[
        'a', 'b', '-', '=', ' ', '\t', '\n', '\x0b', '\x0c', '\r', '\\', 'é',
    ];

    fn random_string(rng: &mut Rng, max_len: usize) -> String {
        (0..rng.below(max_len + 1))
            .map(|_| ALPHABET[rng.below(ALPHABET.len())])
            .collect()
    }

    #[test]
    fn join_split_roundtrip_random() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..5000 {
            let n = rng.below(5);
            // Only the last argument may be empty: that is all `options` can express.
            let mut args: Vec<String> = (0..n)
                .map(|_| loop {
                    let s = random_string(&mut rng, 6);
                    if !s.is_empty() {
                        break s;
                    }
                })
                .collect();
            if rng.below(4) == 0 {
                args.push(String::new());
            }
            assert_roundtrip(&args);

            // And the other direction: any string means the same after a split/join cycle.
            let s = random_string(&mut rng, 16);
            let split = split_options(&s);
            assert_eq!(split_options(&join_options(&split)), split, "input {s:?}");
        }
    }

    fn extracted(endpoint: Option<&str>, rest: Option<&str>) -> ExtractedOptions {
        ExtractedOptions {
            endpoint: endpoint.map(str::to_owned),
            rest: rest.map(str::to_owned),
        }
    }

    #[test]
    fn extract_table() {
        let cases: &[(&str, Option<&str>, Option<&str>)] = &[
            ("", None, None),
            ("   ", None, None),
            ("endpoint=ep-a", Some("ep-a"), None),
            ("--endpoint=ep-a", Some("ep-a"), None),
            ("-c endpoint=ep-a", Some("ep-a"), None),
            ("-cendpoint=ep-a", Some("ep-a"), None),
            ("  -c\tendpoint=ep-a \n", Some("ep-a"), None),
            (
                "-c statement_timeout=5 endpoint=ep-a",
                Some("ep-a"),
                Some("-c statement_timeout=5"),
            ),
            (
                "endpoint=ep-a -c statement_timeout=5",
                Some("ep-a"),
                Some("-c statement_timeout=5"),
            ),
            (
                "-c statement_timeout=5",
                None,
                Some("-c statement_timeout=5"),
            ),
            (
                r"-c search_path=a\ b endpoint=foo",
                Some("foo"),
                Some(r"-c search_path=a\ b"),
            ),
            (
                r"-c search_path=a\\b -cendpoint=foo --work-mem=4MB",
                Some("foo"),
                Some(r"-c search_path=a\\b --work-mem=4MB"),
            ),
            ("endpoint=ep-a -c endpoint=ep-a", Some("ep-a"), None),
            // Flags before `c` in a cluster stay.
            ("-Ec endpoint=ep-a", Some("ep-a"), Some("-E")),
            ("-Ecendpoint=ep-a -j", Some("ep-a"), Some("-E -j")),
            // Values of other options are not ours.
            ("-d endpoint=ep-a", None, Some("-d endpoint=ep-a")),
            ("-dendpoint=ep-a", None, Some("-dendpoint=ep-a")),
            ("-Ed endpoint=ep-a", None, Some("-Ed endpoint=ep-a")),
            // getopt: the first `-c` takes the second as its value; `endpoint=` is an operand.
            ("-c -c endpoint=ep-a", Some("ep-a"), Some("-c -c")),
            // A `-c` setting whose value merely contains `endpoint=`.
            (
                "-c application_name=endpoint=x",
                None,
                Some("-c application_name=endpoint=x"),
            ),
            // Not one of the documented forms: passed through.
            ("--endpoint ep-a", None, Some("--endpoint ep-a")),
            ("-c Endpoint=ep-a", None, Some("-c Endpoint=ep-a")),
            ("-- endpoint=ep-a", Some("ep-a"), Some("--")),
            // An escaped space ends up in the raw value; EndpointId::parse rejects it later.
            (r"endpoint=ep\ a", Some("ep a"), None),
            // Trailing lone backslash: Postgres sees an empty last argument; so will the compute.
            (r"endpoint=ep-a \", Some("ep-a"), Some(r"\")),
            ("-D", None, Some("-D")),
        ];
        for (input, endpoint, rest) in cases {
            assert_eq!(
                extract_endpoint(input),
                Ok(extracted(*endpoint, *rest)),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn extract_errors() {
        let cases: &[(&str, OptionsError)] = &[
            ("endpoint=a endpoint=b", OptionsError::Conflicting),
            ("-c endpoint=a --endpoint=b", OptionsError::Conflicting),
            ("-c", OptionsError::MissingValue),
            ("-c statement_timeout=5 -c", OptionsError::MissingValue),
            ("-Ec", OptionsError::MissingValue),
            ("endpoint=", OptionsError::MissingValue),
            ("-c endpoint=", OptionsError::MissingValue),
            ("-cendpoint=", OptionsError::MissingValue),
            ("--endpoint=", OptionsError::MissingValue),
        ];
        for (input, want) in cases {
            assert_eq!(
                extract_endpoint(input).as_ref(),
                Err(want),
                "input {input:?}"
            );
        }
        let long = "x".repeat(MAX_OPTIONS_LEN + 1);
        assert_eq!(extract_endpoint(&long), Err(OptionsError::TooLong));
        assert!(extract_endpoint(&long[1..]).is_ok());
    }

    #[test]
    fn extracted_rest_keeps_meaning() {
        let input = r"-c search_path=a\ b\\c endpoint=ep-a -c x=\	y";
        let rest = extract_endpoint(input).unwrap().rest.unwrap();
        let mut want = split_options(input);
        want.retain(|a| a != "endpoint=ep-a");
        assert_eq!(split_options(&rest), want);
    }
}
