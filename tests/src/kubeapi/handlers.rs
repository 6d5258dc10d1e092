//! The resource endpoints: `.../[namespaces/{ns}/]{plural}[/{name}[/status]]`
//! with GET (get, list, watch), POST, PUT, PATCH and DELETE, answered as the
//! generic registry answers them (201 on create, `Warning` headers, a
//! `Status` or the object on delete, Table or metadata-only on request).

use super::Shared;
use super::admit::FieldValidation;
use super::cluster::{PatchBody, PatchType, WriteOptions, Written};
use super::http::{Body, Req, Shape, json, negotiate};
use super::list::{ListQuery, list, list_object};
use super::protobuf;
use super::resources::ResourceType;
use super::status::ApiError;
use super::store::Part;
use super::table::{Include, render};
use super::watch;
use hyper::{Method, Response, StatusCode};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::SystemTime;

/// Where a resource path points.
struct Target<'a> {
    ns: Option<&'a str>,
    plural: &'a str,
    name: Option<&'a str>,
    sub: Option<&'a str>,
}

fn target<'a>(rest: &[&'a str]) -> Option<Target<'a>> {
    let t = |ns, plural, name, sub| {
        Some(Target {
            ns,
            plural,
            name,
            sub,
        })
    };
    match *rest {
        ["namespaces", name, sub @ ("status" | "finalize")] => {
            t(None, "namespaces", Some(name), Some(sub))
        }
        ["namespaces", ns, plural] => t(Some(ns), plural, None, None),
        ["namespaces", ns, plural, name] => t(Some(ns), plural, Some(name), None),
        ["namespaces", ns, plural, name, sub] => t(Some(ns), plural, Some(name), Some(sub)),
        [plural] => t(None, plural, None, None),
        [plural, name] => t(None, plural, Some(name), None),
        [plural, name, sub] => t(None, plural, Some(name), Some(sub)),
        _ => None,
    }
}

fn write_options(req: &Req) -> Result<WriteOptions, ApiError> {
    let dry_run = match req.param("dryRun") {
        None | Some("") => false,
        Some("All") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "dryRun: Unsupported value: \"{other}\": supported values: \"All\""
            )));
        }
    };
    Ok(WriteOptions {
        field_validation: FieldValidation::parse(req.param("fieldValidation"))?,
        dry_run,
        manager: Some(manager(req)),
    })
}

/// The field manager: `?fieldManager=`, else the User-Agent's product
/// (`kubectl/v1.37.1 (linux/amd64)` is `kubectl`), as the server derives it.
fn manager(req: &Req) -> String {
    match req.param("fieldManager").filter(|m| !m.is_empty()) {
        Some(m) => m.to_string(),
        None if req.param("fieldManager").is_some() => String::new(),
        None => req
            .user_agent
            .split('/')
            .next()
            .unwrap_or("")
            .chars()
            .take(128)
            .collect(),
    }
}

fn body_json(req: &Req) -> Result<Value, ApiError> {
    let ct = req.content_type.split(';').next().unwrap_or("").trim();
    let refused = || {
        ApiError::unsupported_media_type(
            ct,
            &[
                "application/json",
                "application/yaml",
                "application/vnd.kubernetes.protobuf",
            ],
        )
    };
    match ct {
        "" | "application/json" | "*/*" => serde_json::from_slice(&req.body).map_err(|e| {
            ApiError::bad_request(format!("couldn't get version/kind; json parse error: {e}"))
        }),
        "application/yaml" => serde_yaml_ng::from_slice(&req.body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}"))),
        "application/vnd.kubernetes.protobuf" => protobuf::decode(&req.body).ok_or_else(refused),
        _ => Err(refused()),
    }
}

fn written(w: Written) -> Response<Body> {
    let mut resp = json(
        if w.created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        &w.object,
    );
    for warning in w.warnings {
        let v = format!(
            "299 - \"{}\"",
            warning.replace('\\', "\\\\").replace('"', "\\\"")
        );
        if let Ok(h) = hyper::header::HeaderValue::from_str(&v) {
            resp.headers_mut().append("Warning", h);
        }
    }
    resp
}

fn metadata_only(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]})
}

/// Answers a read in the shape the client asked for.
fn shaped(
    rt: &ResourceType,
    shape: Shape,
    req: &Req,
    items: Vec<Value>,
    meta: Map<String, Value>,
    single: bool,
) -> Value {
    match shape {
        Shape::Table => render(
            &rt.columns,
            &items,
            Include::parse(req.param("includeObject")),
            meta,
            SystemTime::now(),
        ),
        Shape::Metadata if single => metadata_only(&items[0]),
        Shape::Metadata => {
            json!({"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": meta,
            "items": items.iter().map(metadata_only).collect::<Vec<_>>()})
        }
        Shape::Object if single => items.into_iter().next().expect("one object"),
        Shape::Object => list_object(rt, items, meta),
    }
}

pub async fn resource(
    shared: &Arc<Shared>,
    group: &str,
    version: &str,
    rest: &[&str],
    req: &Req,
) -> Result<Response<Body>, ApiError> {
    let t = target(rest).ok_or_else(ApiError::path_not_found)?;
    let rt = shared
        .read(|c| c.registry.find(group, version, t.plural))
        .ok_or_else(ApiError::path_not_found)?;
    if t.ns.is_some() && !rt.namespaced {
        return Err(ApiError::path_not_found());
    }
    if rt.namespaced && t.ns.is_none() && t.name.is_some() {
        return Err(ApiError::path_not_found());
    }
    let part = match t.sub {
        None => Part::Main,
        Some("status") if rt.rules.status_subresource => Part::Status,
        Some(_) => return Err(ApiError::path_not_found()),
    };
    match (t.name, &req.method) {
        (None, &Method::GET) => {
            let q = ListQuery::parse(req)?;
            let shape = negotiate(&req.accept)?;
            if q.watch {
                return Ok(watch::start(shared.clone(), rt, t.ns, q, shape));
            }
            let (items, meta) = list(shared, &rt, t.ns, &q).await?;
            Ok(json(
                StatusCode::OK,
                &shaped(&rt, shape, req, items, meta, false),
            ))
        }
        (None, &Method::POST) if t.sub.is_none() && (t.ns.is_some() || !rt.namespaced) => {
            let (body, opts) = (body_json(req)?, write_options(req)?);
            shared
                .write(|c| c.create(&rt, t.ns, body, &opts))
                .map(written)
        }
        (None, &Method::DELETE) => {
            let q = ListQuery::parse(req)?;
            let opts = write_options(req)?;
            let (items, meta) = list(shared, &rt, t.ns, &q).await?;
            let mut gone = Vec::new();
            for o in items {
                let (ns, name) = (
                    o["metadata"]["namespace"].as_str().map(str::to_string),
                    o["metadata"]["name"].as_str().unwrap_or("").to_string(),
                );
                if let Ok(g) =
                    shared.write(|c| c.delete(&rt, ns.as_deref(), &name, None, opts.dry_run))
                {
                    gone.push(g);
                }
            }
            Ok(json(StatusCode::OK, &list_object(&rt, gone, meta)))
        }
        (Some(name), &Method::GET) => {
            let shape = negotiate(&req.accept)?;
            let obj = shared.read(|c| c.get(&rt, t.ns, name))?;
            let rv = obj["metadata"]["resourceVersion"].clone();
            Ok(json(
                StatusCode::OK,
                &shaped(
                    &rt,
                    shape,
                    req,
                    vec![obj],
                    Map::from_iter([("resourceVersion".to_string(), rv)]),
                    true,
                ),
            ))
        }
        (Some(name), &Method::PUT) => {
            let (body, opts) = (body_json(req)?, write_options(req)?);
            shared
                .write(|c| c.update(&rt, t.ns, name, body, part, &opts))
                .map(written)
        }
        (Some(name), &Method::PATCH) => {
            let ty = match req.content_type.split(';').next().unwrap_or("").trim() {
                "application/merge-patch+json" => PatchType::Merge,
                "application/json-patch+json" => PatchType::Json,
                "application/strategic-merge-patch+json" => PatchType::Strategic,
                "application/apply-patch+yaml" => PatchType::Apply {
                    force: matches!(req.param("force"), Some("true" | "1")),
                },
                other => {
                    let mut accepted = vec![
                        "application/json-patch+json",
                        "application/merge-patch+json",
                    ];
                    if !rt.custom {
                        accepted.push("application/strategic-merge-patch+json");
                    }
                    return Err(ApiError::unsupported_media_type(other, &accepted));
                }
            };
            let opts = write_options(req)?;
            shared
                .write(|c| {
                    c.patch(
                        &rt,
                        t.ns,
                        name,
                        PatchBody {
                            ty,
                            bytes: &req.body,
                        },
                        part,
                        &opts,
                    )
                })
                .map(written)
        }
        (Some(name), &Method::DELETE) if part == Part::Main => {
            let opts: Value = if req.body.is_empty() {
                json!({})
            } else {
                body_json(req)?
            };
            let precondition = opts
                .pointer("/preconditions/resourceVersion")
                .and_then(Value::as_str)
                .map(str::to_string);
            let dry_run = write_options(req)?.dry_run
                || opts["dryRun"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|x| x == "All"));
            let gone =
                shared.write(|c| c.delete(&rt, t.ns, name, precondition.as_deref(), dry_run))?;
            if rt.custom {
                return Ok(json(StatusCode::OK, &gone));
            }
            let mut details =
                json!({"name": name, "kind": rt.plural, "uid": gone["metadata"]["uid"]});
            if !rt.group.is_empty() {
                details["group"] = rt.group.clone().into();
            }
            Ok(json(
                StatusCode::OK,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}),
            ))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}
