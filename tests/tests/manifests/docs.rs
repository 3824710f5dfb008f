//! One name, version and tag for each thing across the manifests and the documentation: the
//! release tag, the images, the PIN Secret, the supported Kubernetes versions, and text that
//! speaks of the project itself.

use serde_json::Value;

use nitrokey_e2e::host::repo;
use nitrokey_e2e::manifests::*;

#[test]
fn the_release_tag_is_set_in_one_place_and_matches_the_dockerfile() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let version = release_version();
    assert!(
        dockerfile.contains(&format!("org.opencontainers.image.version=\"{version}\"")),
        "the Dockerfile's version label must be {version}"
    );
    // Only the images component names a tag for the project's images in the manifests.
    let mut tagged = Vec::new();
    let mut stack = vec![repo().join("deploy")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                if !path.ends_with("helm") {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).expect("read");
                let names_image = [DEVICE_PLUGIN_IMAGE, UNSEAL_INIT_IMAGE].iter().any(|i| {
                    text.contains(&format!("{i}:")) || (text.contains(i) && text.contains("newTag"))
                });
                if names_image {
                    tagged.push(rel(&path));
                }
            }
        }
    }
    assert_eq!(
        tagged,
        vec!["deploy/components/images/kustomization.yaml".to_string()],
        "image tag set in several places"
    );
    // Wherever documentation or scripts name one of the images with a tag, it is this release.
    let mut wrong = Vec::new();
    for file in user_facing_files() {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for image in [
            DEVICE_PLUGIN_IMAGE,
            UNSEAL_INIT_IMAGE,
            "ghcr.io/nitrokey-vault/nitrokey-vault",
        ] {
            for (i, _) in text.match_indices(&format!("{image}:")) {
                let tag: String = text[i + image.len() + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || ".-_".contains(*c))
                    .collect();
                if tag != version || image.ends_with("/nitrokey-vault") {
                    wrong.push(format!("{}: {image}:{tag}", rel(&file)));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "images must be named {DEVICE_PLUGIN_IMAGE}:{version} or {UNSEAL_INIT_IMAGE}:{version}: {wrong:#?}"
    );
}

#[test]
fn the_images_component_names_each_project_image_and_its_tag() {
    // Pointing every overlay at another registry is one edit there: newName and newTag.
    let path = repo().join("deploy/components/images/kustomization.yaml");
    let text = std::fs::read_to_string(&path).expect("read the images component");
    let doc: Value = serde_saphyr::from_str(&text).expect("the images component parses");
    let entries = doc["images"].as_array().expect("images: a list");
    for image in [DEVICE_PLUGIN_IMAGE, UNSEAL_INIT_IMAGE] {
        let entry = entries
            .iter()
            .find(|e| e["name"] == image)
            .unwrap_or_else(|| panic!("no entry for {image}"));
        assert_eq!(entry["newName"], image, "{image}: newName");
        assert_eq!(
            entry["newTag"],
            release_version().as_str(),
            "{image}: newTag"
        );
    }
}

#[test]
fn one_pin_secret_name_and_no_pin_on_a_command_line() {
    // Every place that creates or names the PIN Secret uses one name, and creates it from a
    // file: a PIN on a command line ends up in shell history and the process list.
    let mut problems = Vec::new();
    for file in user_facing_files() {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines() {
            if line.contains("--from-literal=pin") {
                problems.push(format!("{}: {}", rel(&file), line.trim()));
            }
            if let Some(i) = line.find("create secret generic ") {
                let name = line[i + 22..].split_whitespace().next().unwrap_or_default();
                let about_pin = line.contains("pin=") || line.contains("PIN");
                if about_pin && name != PIN_SECRET {
                    problems.push(format!("{}: Secret {name}: {}", rel(&file), line.trim()));
                }
            }
            for stale in ["secretKeyRef: {name: hsm-pin", "secretName: hsm-pin"] {
                if line.contains(stale) {
                    problems.push(format!("{}: {}", rel(&file), line.trim()));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn supported_kubernetes_versions_are_stated_and_agree() {
    let chart: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo().join(CHART).join("Chart.yaml")).expect("Chart.yaml"),
    )
    .expect("Chart.yaml parses");
    assert_eq!(
        chart["kubeVersion"],
        format!(">={MIN_KUBERNETES}.0-0").as_str(),
        "the chart installs where the manifests are valid"
    );
    let guide = std::fs::read_to_string(repo().join("deploy/README.md")).expect("deploy/README.md");
    assert!(
        guide.contains(&format!("Kubernetes {MIN_KUBERNETES}"))
            && guide.contains(&format!("Kubernetes {NATIVE_SIDECAR_KUBERNETES}")),
        "deploy/README.md states the supported versions ({MIN_KUBERNETES}+, native sidecars \
         {NATIVE_SIDECAR_KUBERNETES}+)"
    );
}

#[test]
fn user_facing_text_speaks_of_the_project_itself() {
    let mut found = Vec::new();
    for file in user_facing_files() {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            let lower = line.to_ascii_lowercase();
            if lower.contains("seed recipe")
                || lower.contains("the seed's")
                || lower.contains("the seed ")
            {
                found.push(format!("{}:{}: {}", rel(&file), n + 1, line.trim()));
            }
        }
    }
    assert!(found.is_empty(), "{found:#?}");
}
