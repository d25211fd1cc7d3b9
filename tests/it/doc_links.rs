//! Every relative link in the repository's Markdown resolves: the file (or directory)
//! exists, and a `#fragment` names a heading (as GitHub makes its anchors) or an
//! `<a id>` of the target page.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The Markdown files whose links are checked, relative to the repository.
const PAGES: &[&str] = &[
    "README.md",
    "docs/API.md",
    "docs/ARCHITECTURE.md",
    "docs/BENCHMARKS.md",
    "docs/CONFIGURATION.md",
    "docs/OPERATIONS.md",
    "docs/SCALING.md",
    "fuzz/README.md",
    "clients/web/README.md",
    "clients/miniprogram/README.md",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The page's lines outside fenced code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut fenced = false;
    text.lines()
        .filter(|line| {
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced
        })
        .collect()
}

/// GitHub's anchor for a heading: lower case, punctuation dropped (but `-` and `_`),
/// spaces as `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every anchor a page offers: its headings' slugs (a repeated one gets `-1`, `-2`…)
/// and its `<a id="…">`s.
fn anchors(text: &str) -> HashSet<String> {
    let mut found = HashSet::new();
    for line in prose(text) {
        if let Some(heading) = line.strip_prefix('#') {
            let base = slug(heading.trim_start_matches('#'));
            let mut anchor = base.clone();
            let mut n = 0;
            while !found.insert(anchor.clone()) {
                n += 1;
                anchor = format!("{base}-{n}");
            }
        }
        let mut rest = line;
        while let Some(at) = rest.find("<a id=\"") {
            let id = &rest[at + 7..];
            let Some(end) = id.find('"') else { break };
            found.insert(id[..end].to_string());
            rest = &id[end..];
        }
    }
    found
}

/// The targets of the page's inline links `[text](target)`, outside code.
fn links(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    for line in prose(text) {
        // Inline code may hold brackets and parentheses that are no link.
        let line: String = line
            .split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(_, part)| part)
            .collect::<Vec<_>>()
            .join("``");
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let target = &rest[at + 2..];
            let Some(end) = target.find(')') else { break };
            targets.push(target[..end].trim().to_string());
            rest = &target[end..];
        }
    }
    targets
}

fn broken_links_of(page: &str) -> Vec<String> {
    let path = repo().join(page);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{page}: {e}"));
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut broken = Vec::new();
    for target in links(&text) {
        if target.contains("://") || target.starts_with("mailto:") || target.is_empty() {
            continue;
        }
        let (file, fragment) = match target.split_once('#') {
            Some((file, fragment)) => (file, Some(fragment)),
            None => (target.as_str(), None),
        };
        let file_path = if file.is_empty() {
            path.clone()
        } else {
            dir.join(file)
        };
        if !file_path.exists() {
            broken.push(format!("{page}: {target}: no such file"));
            continue;
        }
        let Some(fragment) = fragment else { continue };
        let target_text = std::fs::read_to_string(&file_path).unwrap_or_default();
        if !anchors(&target_text).contains(fragment) {
            broken.push(format!("{page}: {target}: no such heading"));
        }
    }
    broken
}

#[test]
fn every_link_between_the_docs_resolves() {
    let broken: Vec<String> = PAGES.iter().flat_map(|p| broken_links_of(p)).collect();
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn anchors_are_made_as_github_makes_them() {
    assert_eq!(
        slug(" Forward-auth: wxauth in front of your other back ends"),
        "forward-auth-wxauth-in-front-of-your-other-back-ends"
    );
    assert_eq!(slug(" WeChat's access token"), "wechats-access-token");
    assert_eq!(slug(" `@scale`: sled's cache"), "scale-sleds-cache");
    let page = "# A\n## B\n```\n# not a heading\n```\n## B\n<a id=\"rate-limits\"></a>x\n";
    let found = anchors(page);
    for anchor in ["a", "b", "b-1", "rate-limits"] {
        assert!(found.contains(anchor), "{anchor}: {found:?}");
    }
    assert!(!found.contains("not-a-heading"));
    assert_eq!(
        links("see [x](A.md#b) and `[y](ignored)` and [z](../c)"),
        ["A.md#b", "../c"]
    );
}
