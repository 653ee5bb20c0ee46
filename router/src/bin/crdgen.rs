//! Prints the `PgwakeEndpoint` CRD as YAML: `cargo run -p pgwake-router --bin crdgen > deploy/base/crd.yaml`.

fn main() {
    print!("{}", pgwake_router::crd::crd_yaml());
}
