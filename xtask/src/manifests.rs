//! `cargo xtask manifests --image REF`: deploy/router.yaml with the router's image set, ready
//! for `kubectl apply -f -` (and `kubectl delete -f -` of the same output to uninstall).

use anyhow::{Context, Result, bail};

use crate::build::workspace;

/// The image line of deploy/router.yaml (the one `cargo xtask image` builds).
const IMAGE_LINE: &str = concat!("image: kt-router:", env!("CARGO_PKG_VERSION"));

/// The rendered manifests.
pub fn render(image: Option<&str>) -> Result<String> {
    let path = workspace().join("deploy/router.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    with_image(&text, image)
}

fn with_image(text: &str, image: Option<&str>) -> Result<String> {
    let found = text.matches(IMAGE_LINE).count();
    if found != 1 {
        bail!("deploy/router.yaml must hold `{IMAGE_LINE}` exactly once (found {found})");
    }
    let Some(image) = image else {
        return Ok(text.to_string());
    };
    if image.is_empty() || image.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
        bail!("--image {image:?} is not an image reference");
    }
    Ok(text.replacen(IMAGE_LINE, &format!("image: {image}"), 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_is_set_once_and_nothing_else_changes() {
        let text = render(None).unwrap();
        let out = with_image(&text, Some("registry.example.com/kt/kt-router:0.1.0")).unwrap();
        assert!(out.contains("image: registry.example.com/kt/kt-router:0.1.0\n"));
        assert_eq!(
            out.replace("registry.example.com/kt/kt-router:0.1.0", &IMAGE_LINE[7..]),
            text
        );
        assert!(with_image(&text, Some("bad ref")).is_err());
        assert!(with_image("kind: DaemonSet\n", Some("x:1")).is_err());
    }
}
