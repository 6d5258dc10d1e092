//! API errors as the `Status` objects a real API server writes (`reason`,
//! `code`, `details`), and the field errors an `Invalid` one is made of, with
//! the wording of `k8s.io/apimachinery/pkg/util/validation/field`.

use serde_json::{Map, Value, json};

/// One refused request: what the HTTP layer writes as a `Status`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Map<String, Value>,
}

/// Who an error is about: the resource (`leases`, group `coordination.k8s.io`)
/// and the object's name, as `details` names them.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub group: &'a str,
    pub plural: &'a str,
    pub name: &'a str,
}

impl Subject<'_> {
    /// `leases.coordination.k8s.io`, or plain `services` in the core group.
    fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    fn details(&self, kind: &str) -> Map<String, Value> {
        let mut d = Map::new();
        if !self.name.is_empty() {
            d.insert("name".into(), self.name.into());
        }
        if !self.group.is_empty() {
            d.insert("group".into(), self.group.into());
        }
        d.insert("kind".into(), kind.into());
        d
    }
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: Map::new(),
        }
    }

    pub fn not_found(s: Subject) -> ApiError {
        let message = format!("{} \"{}\" not found", s.group_resource(), s.name);
        ApiError {
            details: s.details(s.plural),
            ..ApiError::new(404, "NotFound", message)
        }
    }

    pub fn already_exists(s: Subject) -> ApiError {
        let message = format!("{} \"{}\" already exists", s.group_resource(), s.name);
        ApiError {
            details: s.details(s.plural),
            ..ApiError::new(409, "AlreadyExists", message)
        }
    }

    /// A stale `resourceVersion`: the message clients (and people) grep for.
    pub fn conflict(s: Subject) -> ApiError {
        let message = format!(
            "Operation cannot be fulfilled on {} \"{}\": the object has been modified; \
             please apply your changes to the latest version and try again",
            s.group_resource(),
            s.name
        );
        ApiError {
            details: s.details(s.plural),
            ..ApiError::new(409, "Conflict", message)
        }
    }

    /// 422 naming every bad field: `Kind.group "name" is invalid: ...`, one
    /// error bare, several in brackets, as `errors.NewInvalid` joins them.
    pub fn invalid(group: &str, kind: &str, name: &str, errs: &[FieldError]) -> ApiError {
        let qualified = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        let all: Vec<String> = errs.iter().map(FieldError::to_string).collect();
        let joined = if all.len() == 1 {
            all[0].clone()
        } else {
            format!("[{}]", all.join(", "))
        };
        let message = format!("{qualified} \"{name}\" is invalid: {joined}");
        let s = Subject {
            group,
            plural: kind,
            name,
        };
        let mut details = s.details(kind);
        let causes: Vec<Value> = errs.iter().map(FieldError::cause).collect();
        details.insert("causes".into(), causes.into());
        ApiError {
            details,
            ..ApiError::new(422, "Invalid", message)
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    /// 410: history the request needs was compacted away.
    pub fn expired(message: impl Into<String>) -> ApiError {
        ApiError::new(410, "Expired", message)
    }

    pub fn path_not_found() -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    pub fn unsupported_media_type(content_type: &str, accepted: &[&str]) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: {}",
                if accepted.is_empty() {
                    content_type.to_string()
                } else {
                    accepted.join(", ")
                }
            ),
        )
    }

    pub fn not_acceptable() -> ApiError {
        ApiError::new(
            406,
            "NotAcceptable",
            "only the following media types are accepted: application/json, application/yaml, \
             application/vnd.kubernetes.protobuf",
        )
    }

    /// The `Status` object, exactly as the server writes it.
    pub fn to_status(&self) -> Value {
        let mut v = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if !self.details.is_empty() {
            v["details"] = Value::Object(self.details.clone());
        }
        v
    }
}

/// What is wrong with one field.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldErrorKind {
    Required,
    Invalid,
    /// The value's JSON type is not the schema's (reported as "Invalid value").
    TypeInvalid,
    NotSupported(Vec<String>),
    TooLong(u64),
    TooMany(u64),
    Forbidden,
}

/// One field error: `spec.rollout.steps[0]: Invalid value: 150: ...`.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub kind: FieldErrorKind,
    pub value: Value,
    pub detail: String,
}

impl FieldError {
    pub fn new(
        field: &str,
        kind: FieldErrorKind,
        value: &Value,
        detail: impl Into<String>,
    ) -> Self {
        FieldError {
            field: field.to_string(),
            kind,
            value: value.clone(),
            detail: detail.into(),
        }
    }

    pub fn required(field: &str, detail: &str) -> Self {
        FieldError::new(field, FieldErrorKind::Required, &Value::Null, detail)
    }

    /// The `StatusCause.reason` (`FieldValueInvalid`, ...).
    pub fn reason(&self) -> &'static str {
        match self.kind {
            FieldErrorKind::Required => "FieldValueRequired",
            FieldErrorKind::Invalid => "FieldValueInvalid",
            FieldErrorKind::TypeInvalid => "FieldValueTypeInvalid",
            FieldErrorKind::NotSupported(_) => "FieldValueNotSupported",
            FieldErrorKind::TooLong(_) => "FieldValueTooLong",
            FieldErrorKind::TooMany(_) => "FieldValueTooMany",
            FieldErrorKind::Forbidden => "FieldValueForbidden",
        }
    }

    /// The message without the field (`field.Error.ErrorBody`).
    pub fn body(&self) -> String {
        let value = go_value(&self.value);
        let head = match &self.kind {
            FieldErrorKind::Required => "Required value".to_string(),
            FieldErrorKind::Invalid | FieldErrorKind::TypeInvalid => {
                format!("Invalid value: {value}")
            }
            FieldErrorKind::NotSupported(valid) => {
                let quoted: Vec<String> = valid.iter().map(|v| format!("\"{v}\"")).collect();
                format!(
                    "Unsupported value: {value}: supported values: {}",
                    quoted.join(", ")
                )
            }
            FieldErrorKind::TooLong(max) => format!("Too long: may not be more than {max} bytes"),
            FieldErrorKind::TooMany(max) => {
                format!("Too many: {}: must have at most {max} items", self.value)
            }
            FieldErrorKind::Forbidden => "Forbidden".to_string(),
        };
        if self.detail.is_empty() {
            head
        } else {
            format!("{head}: {}", self.detail)
        }
    }

    pub fn cause(&self) -> Value {
        json!({"reason": self.reason(), "message": self.body(), "field": self.field})
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.body())
    }
}

/// A value as Go's `%#v` shows a scalar: strings quoted, numbers bare.
fn go_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Null => "null".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_joins_several_errors_in_brackets_and_names_each_field() {
        let errs = [
            FieldError::new(
                "spec.affinity",
                FieldErrorKind::NotSupported(vec!["client".into(), "connection".into()]),
                &json!("x"),
                "",
            ),
            FieldError::required("spec.canary", ""),
        ];
        let e = ApiError::invalid("kanari.dev", "CanaryRelease", "web", &errs);
        assert_eq!(e.code, 422);
        assert_eq!(
            e.message,
            "CanaryRelease.kanari.dev \"web\" is invalid: [spec.affinity: Unsupported value: \"x\": \
             supported values: \"client\", \"connection\", spec.canary: Required value]"
        );
        let s = e.to_status();
        assert_eq!(s["details"]["causes"][1]["field"], "spec.canary");
        assert_eq!(s["details"]["causes"][1]["reason"], "FieldValueRequired");
        assert_eq!(s["details"]["kind"], "CanaryRelease");
    }

    #[test]
    fn conflict_names_the_qualified_resource() {
        let e = ApiError::conflict(Subject {
            group: "coordination.k8s.io",
            plural: "leases",
            name: "x",
        });
        assert!(
            e.message
                .starts_with("Operation cannot be fulfilled on leases.coordination.k8s.io \"x\"")
        );
        let s = e.to_status();
        assert_eq!(s["code"], 409);
        assert_eq!(
            s["details"],
            json!({"name": "x", "group": "coordination.k8s.io", "kind": "leases"})
        );
    }
}
