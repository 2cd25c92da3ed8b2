//! Attribution graphs in the feature browser (`view-features --graphs DIR`): each graph that
//! `attribute --out DIR` wrote, checked to belong to the browser's suite, becomes
//! `data/graph-<slug>.js` (`SCAE.addGraph(<graph>)`), listed in `data/graphs.js`
//! (`SCAE.graphs = [{slug, prompt, nodes, links}]`, written even when empty); `graph.html`
//! draws them.

use std::path::Path;

use serde_json::{json, Value};

use crate::attrib::json::{missing_field, GRAPH_METADATA};
use crate::error::{Error, IoContext, Result};

/// A graph read for the browser.
pub struct BrowserGraph {
    pub slug: String,
    pub graph: Value,
}

/// The most links of a graph the browser takes: the graph view lays out every link in the page
/// (a pruned graph has thousands); an unpruned one (`attribute --no-prune`, millions of links,
/// a GB of JSON) would take tens of GB to read and could not be drawn.
pub const MAX_LINKS: usize = 200_000;

/// Whether the graph file `path` has more than `max` links: read as a stream, nothing of it
/// kept, and only as far as needed — the reading stops once `links` has `max + 1` entries (an
/// unpruned graph holds millions: counting all of a 1 GB file's took ~1.3 s) or once `links`
/// has been counted. A file too short to hold `max + 1` of any JSON value (each at least a
/// byte and its comma) is not read here at all (its whole reading, after, checks it).
fn more_links_than(path: &Path, max: usize) -> Result<bool> {
    use serde::de::{DeserializeSeed, Deserializer, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use std::cell::Cell;
    let file = std::fs::File::open(path).at(path)?;
    if file.metadata().at(path)?.len() < 2u64.saturating_mul(max as u64 + 1) {
        return Ok(false);
    }
    // The count, and whether the reading was stopped on purpose (the stop is an error to serde).
    let (count, stopped) = (Cell::new(0usize), Cell::new(false));
    struct Top<'a>(&'a Cell<usize>, &'a Cell<bool>, usize);
    struct Links<'a>(&'a Cell<usize>, &'a Cell<bool>, usize);
    impl<'de> Visitor<'de> for Top<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an attribution graph")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
            while let Some(key) = map.next_key::<String>()? {
                if key == "links" {
                    map.next_value_seed(Links(self.0, self.1, self.2))?;
                    self.1.set(true);
                    return Err(A::Error::custom("counted"));
                }
                map.next_value::<IgnoredAny>()?;
            }
            Ok(())
        }
    }
    impl<'de> DeserializeSeed<'de> for Links<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
            d.deserialize_seq(self)
        }
    }
    impl<'de> Visitor<'de> for Links<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of links")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {
                self.0.set(self.0.get() + 1);
                if self.0.get() > self.2 {
                    self.1.set(true);
                    return Err(A::Error::custom("past the limit"));
                }
            }
            Ok(())
        }
    }
    let mut de = serde_json::Deserializer::from_reader(std::io::BufReader::new(file));
    match de.deserialize_map(Top(&count, &stopped, max)) {
        Err(_) if stopped.get() => {}
        Err(e) => return Err(Error::input(path, format!("not JSON: {e}"))),
        Ok(()) => {}
    }
    Ok(count.get() > max)
}

/// The graphs listed in `dir/graph-metadata.json`, each checked: readable, with the format's
/// required fields, made by `attribute` for the suite whose id is `suite_id`. A graph of more
/// than `max_links` links is left out, said on stderr.
pub fn read(dir: &Path, suite_id: &str, max_links: usize) -> Result<Vec<BrowserGraph>> {
    let list_path = dir.join(GRAPH_METADATA);
    let text = std::fs::read_to_string(&list_path).map_err(|e| {
        Error::input(
            &list_path,
            format!("--graphs: expected the folder's list of graphs, which `attribute --out` writes ({e})"),
        )
    })?;
    let list: Value = serde_json::from_str(&text).map_err(|e| Error::input(&list_path, format!("not JSON: {e}")))?;
    let entries = list["graphs"].as_array().ok_or_else(|| Error::input(&list_path, "expected {\"graphs\": [...]}"))?;
    let mut out = Vec::new();
    for entry in entries {
        let slug = entry["slug"].as_str().unwrap_or_default();
        if slug.is_empty()
            || slug.starts_with('.')
            || !slug.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(Error::input(
                &list_path,
                format!("graph slug `{slug}`: expected letters, digits, `-`, `_`, `.`"),
            ));
        }
        let path = dir.join(format!("{slug}.json"));
        if more_links_than(&path, max_links)? {
            crate::note!(
                "view-features: --graphs: {}: more than the {max_links} links the graph view draws; left out of the browser (hint: attribute without --no-prune keeps what matters)",
                path.display()
            );
            continue;
        }
        let text = std::fs::read_to_string(&path).at(&path)?;
        let graph: Value = serde_json::from_str(&text).map_err(|e| Error::input(&path, format!("not JSON: {e}")))?;
        if let Some(field) = missing_field(&graph) {
            return Err(Error::input(&path, format!("not an attribution graph: lacks {field}")));
        }
        match graph["metadata"]["info"]["suite_id"].as_str() {
            Some(id) if id == suite_id => {}
            Some(id) => {
                return Err(Error::input(
                    &path,
                    format!(
                        "made for suite {}, not this browser's suite {}; its nodes would open other features' pages (run attribute with this --suite)",
                        crate::util::fingerprint::short(id),
                        crate::util::fingerprint::short(suite_id)
                    ),
                ))
            }
            None => return Err(Error::input(&path, "metadata.info.suite_id: expected the suite that scae attribute records, found none")),
        }
        out.push(BrowserGraph { slug: slug.to_string(), graph });
    }
    Ok(out)
}

/// Write `data/graphs.js` and one `data/graph-<slug>.js` per graph into `data`; returns bytes.
pub fn write(data: &Path, graphs: &[BrowserGraph]) -> Result<usize> {
    let list: Vec<Value> = graphs
        .iter()
        .map(|g| {
            json!({
                "slug": g.slug,
                "prompt": g.graph["metadata"]["prompt"],
                "nodes": g.graph["nodes"].as_array().map_or(0, Vec::len),
                "links": g.graph["links"].as_array().map_or(0, Vec::len),
            })
        })
        .collect();
    let mut bytes = 0;
    let mut put = |name: String, body: String| -> Result<()> {
        bytes += body.len();
        crate::util::io::write_atomic(&data.join(name), body.as_bytes())
    };
    put("graphs.js".into(), format!("SCAE.graphs = {};\n", Value::Array(list)))?;
    for g in graphs {
        put(format!("graph-{}.js", g.slug), format!("SCAE.addGraph({});\n", g.graph))?;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attrib::json::REQUIRED;

    /// A graph with every required field, made for suite `S`, with `links` links.
    fn graph(links: usize) -> Value {
        let obj = |fields: &[&str]| Value::Object(fields.iter().map(|f| (f.to_string(), json!(0))).collect());
        let mut g = obj(REQUIRED.top);
        g["metadata"] = obj(REQUIRED.metadata);
        g["metadata"]["info"] = json!({"suite_id": "S"});
        g["qParams"] = obj(REQUIRED.q_params);
        g["nodes"] = json!([obj(REQUIRED.node)]);
        g["links"] = Value::Array(vec![obj(REQUIRED.link); links]);
        g
    }

    #[test]
    fn graphs_with_more_links_than_the_view_draws_are_left_out() {
        let dir = std::env::temp_dir().join(format!("scae-graphs-max-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (slug, n) in [("small", 3), ("big", 12)] {
            std::fs::write(dir.join(format!("{slug}.json")), graph(n).to_string()).unwrap();
        }
        let list = json!({"graphs": [{"slug": "small"}, {"slug": "big"}]});
        std::fs::write(dir.join(GRAPH_METADATA), list.to_string()).unwrap();
        let big = dir.join("big.json");
        assert!(more_links_than(&big, 11).unwrap() && !more_links_than(&big, 12).unwrap());
        // `links` after other fields, the reading stopped inside it or after it, a file too
        // short to hold more, and a file that is not JSON.
        let late = dir.join("late.json");
        std::fs::write(&late, r#"{"nodes": [1, 2], "links": [0, {}, [], "x"], "z": ["#).unwrap();
        let more: Vec<bool> = [0, 3, 4, 100].iter().map(|&m| more_links_than(&late, m).unwrap()).collect();
        assert_eq!(more, [true, true, false, false]);
        std::fs::write(&late, "links: 3").unwrap();
        assert!(more_links_than(&late, 1).unwrap_err().to_string().contains("not JSON"));
        let kept = read(&dir, "S", 10).unwrap();
        assert_eq!(kept.iter().map(|g| g.slug.as_str()).collect::<Vec<_>>(), ["small"]);
        assert_eq!(read(&dir, "S", 12).unwrap().len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
