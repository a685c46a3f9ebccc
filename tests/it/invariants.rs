//! The architecture invariants of ARCHITECTURE.md that a test can check: which source files
//! may name the transport's types, the storage engine, its adapter and AWS.

use std::path::{Path, PathBuf};

/// The Rust source files under `dir`, in order.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = crate::harness::files_under(dir)
        .into_iter()
        .filter(|p| p.extension() == Some("rs".as_ref()))
        .collect();
    out.sort();
    out
}

/// The files (relative to `src/`) whose code names `crate_path`: a crate as a path's first
/// segment (`tonic::`, `use tonic;`), a type (capitalised) anywhere; comments aside.
fn naming(crate_path: &str) -> Vec<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    for file in sources(&src) {
        let text = std::fs::read_to_string(&file).expect("source");
        let names = text.lines().map(str::trim_start).any(|line| {
            // (`mod sled;` declares a module of that name, it does not use the crate.)
            !line.starts_with("//")
                && !line.starts_with("mod ")
                && !line.starts_with("pub mod ")
                && line.match_indices(crate_path).any(|(at, _)| {
                    let before = line[..at].chars().next_back();
                    let after = &line[at + crate_path.len()..];
                    let whole = !after.starts_with(|c: char| c == '_' || c.is_alphanumeric());
                    // A crate is named by a path (`sled::`); a type by its name.
                    let path = after.starts_with("::") || after.starts_with(';');
                    let is_type = crate_path.starts_with(|c: char| c.is_uppercase());
                    !before.is_some_and(|c| c == ':' || c == '_' || c.is_alphanumeric())
                        && whole
                        && (path || is_type)
                })
        });
        if names {
            let relative = file.strip_prefix(&src).expect("under src");
            out.push(relative.to_string_lossy().into_owned());
        }
    }
    out
}

fn assert_only(crate_path: &str, allowed: &[&str]) {
    let offending: Vec<String> = naming(crate_path)
        .into_iter()
        .filter(|f| {
            !allowed
                .iter()
                .any(|a| f == a || (a.ends_with('/') && f.starts_with(a)))
        })
        .collect();
    assert!(
        offending.is_empty(),
        "{crate_path} is named outside {allowed:?}: {offending:?}"
    );
}

/// The transport's types stop at the service layer (with `rpcmetrics.rs`, the gRPC
/// transport's metrics middleware, `client.rs` and the binaries, which are gRPC clients).
/// `NOT_YET_MOVED` lists files that still name them while a change moves them out (none
/// now); a file that no longer needs its place fails the test until it is taken off.
#[test]
fn only_the_service_layer_knows_tonic_and_prost() {
    const SERVICE_LAYER: &[&str] = &[
        "api.rs",
        "service.rs",
        "server/",
        "admission.rs",
        "connection.rs",
        "rpcmetrics.rs",
        "client.rs",
        "main.rs",
        "bin/",
    ];
    const NOT_YET_MOVED: &[&str] = &[];
    let allowed: Vec<&str> = SERVICE_LAYER.iter().chain(NOT_YET_MOVED).copied().collect();
    for crate_path in ["tonic", "prost"] {
        assert_only(crate_path, &allowed);
    }
    let mut naming_either = naming("tonic");
    naming_either.extend(naming("prost"));
    for file in NOT_YET_MOVED {
        assert!(
            naming_either.iter().any(|f| f == file),
            "{file} no longer names tonic or prost: take it off NOT_YET_MOVED"
        );
    }
}

#[test]
fn only_the_sled_adapter_knows_sled_and_only_store_names_it() {
    assert_only("sled", &["store/sled/"]);
    assert_only("SledStore", &["store/"]);
}

#[test]
fn only_the_postgres_adapter_knows_postgres() {
    for crate_path in ["postgres", "tokio_postgres"] {
        assert_only(crate_path, &["store/postgres/"]);
    }
}

#[test]
fn only_the_keyring_talks_to_aws() {
    for crate_path in [
        "aws_sdk_kms",
        "aws_config",
        "aws_smithy_types",
        "aws_smithy_http_client",
    ] {
        assert_only(crate_path, &["keyring/aws.rs"]);
    }
}

/// The modules each library module's code (tests aside) imports: `crate::a` names `a` (and
/// `a::b` for a module of `store`), `super::b` names its sibling `b`.
fn imports() -> Vec<(String, Vec<String>)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    for file in sources(&src) {
        let relative = file.strip_prefix(&src).expect("under src");
        let path = relative.to_string_lossy().replace('\\', "/");
        if path.starts_with("bin/") || path == "main.rs" || path == "lib.rs" {
            continue;
        }
        if path.ends_with("/tests.rs") {
            continue;
        }
        let module = path
            .trim_end_matches(".rs")
            .trim_end_matches("/mod")
            .replace('/', "::");
        let parent = module.rsplit_once("::").map(|(p, _)| p.to_string());
        let text = std::fs::read_to_string(&file).expect("source");
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let mut named = Vec::new();
        for line in code.lines().map(str::trim_start) {
            if line.starts_with("//") {
                continue;
            }
            for (at, _) in line.match_indices("crate::") {
                let rest = &line[at + "crate::".len()..];
                let mut parts = rest
                    .split(|c: char| !(c == '_' || c.is_ascii_lowercase() || c == ':'))
                    .next()
                    .unwrap_or_default()
                    .split("::")
                    .filter(|p| !p.is_empty());
                if let Some(first) = parts.next() {
                    named.push(first.to_string());
                    if first == "store"
                        && let Some(second) = parts.next()
                    {
                        named.push(format!("store::{second}"));
                    }
                }
            }
            for (at, _) in line.match_indices("super::") {
                let rest = &line[at + "super::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| *c == '_' || c.is_ascii_lowercase())
                    .collect();
                if let (false, Some(parent)) = (name.is_empty(), &parent) {
                    named.push(format!("{parent}::{name}"));
                }
            }
        }
        named.sort();
        named.dedup();
        out.push((module, named));
    }
    out
}

/// No two modules import each other, neither among the top-level modules nor among the
/// modules of `store` (ARCHITECTURE.md: the store is the bottom layer, and in it the commit
/// core, the adapters and the trail's parts depend one way).
#[test]
fn no_two_modules_import_each_other() {
    let graph = imports();
    let top = |m: &str| m.split("::").next().unwrap_or(m).to_string();
    let mut edges = std::collections::BTreeSet::new();
    for (module, named) in &graph {
        for other in named {
            if top(other) != top(module) {
                edges.insert((top(module), top(other)));
            } else if other != module && module.contains("::") == other.contains("::") {
                edges.insert((module.clone(), other.clone()));
            }
        }
    }
    let mutual: Vec<_> = edges
        .iter()
        .filter(|(a, b)| a < b && edges.contains(&(b.clone(), a.clone())))
        .collect();
    assert!(
        mutual.is_empty(),
        "modules importing each other: {mutual:?}"
    );
    // The check sees imports at all: the store's adapter imports the commit core.
    assert!(edges.contains(&("store::sled".into(), "store::commit".into())));
    assert!(edges.contains(&("vault".into(), "store".into())));
}
