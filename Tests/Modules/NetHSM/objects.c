// NetHSM test module: object attributes — building objects from templates, reading and
// matching attributes, and the few changes C_SetAttributeValue allows.
//
// All objects: CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_MODIFIABLE, CKA_LABEL.
// All keys: CKA_KEY_TYPE, CKA_ID, CKA_LOCAL, CKA_DERIVE.
// Secret keys (CKO_SECRET_KEY; CKK_GENERIC_SECRET 1-4096 bytes, CKK_AES 16/24/32 bytes):
//   CKA_VALUE, CKA_VALUE_LEN, CKA_CHECK_VALUE, CKA_SENSITIVE, CKA_EXTRACTABLE,
//   CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE, CKA_ALWAYS_AUTHENTICATE, CKA_SIGN, CKA_VERIFY,
//   CKA_ENCRYPT, CKA_DECRYPT, CKA_WRAP, CKA_UNWRAP.
// EC private keys (CKO_PRIVATE_KEY, CKK_EC, P-256): CKA_EC_PARAMS, CKA_VALUE (the scalar),
//   CKA_SENSITIVE, CKA_EXTRACTABLE, CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE,
//   CKA_ALWAYS_AUTHENTICATE, CKA_SIGN, CKA_DECRYPT, CKA_UNWRAP, CKA_DECAPSULATE (3.2).
// EC public keys (CKO_PUBLIC_KEY, CKK_EC, P-256): CKA_EC_PARAMS, CKA_EC_POINT, CKA_VERIFY,
//   CKA_ENCRYPT, CKA_WRAP, CKA_ENCAPSULATE (3.2).
// Data objects (CKO_DATA): CKA_APPLICATION, CKA_VALUE.
// Anything else is CKR_ATTRIBUTE_TYPE_INVALID (in particular there is no CKA_UNIQUE_ID).
//
// Usage flags default to true where a mechanism of this module uses them with that key type
// (generic secret: sign, verify; AES: encrypt, decrypt, wrap, unwrap), else false; CKA_DERIVE
// is false unless asked for (the PKCS#11 default), and so are CKA_ENCAPSULATE and CKA_DECAPSULATE. Flags nothing uses (an EC key's sign, say)
// are stored and reported only.
//
// CKA_CHECK_VALUE: AES keys, the first 3 bytes of the ECB encryption of a zero block (as
// PKCS#11 says); generic secret keys, the first 3 bytes of SHA-256 of CKA_VALUE (PKCS#11 2.40
// says SHA-1; this module has no SHA-1 and the value only has to be stable).
#define _GNU_SOURCE  // explicit_bzero
#include "nethsm_internal.h"

#include <string.h>

static int is_secret(const struct nh_object *o) { return o->klass == CKO_SECRET_KEY; }
static int is_private_key(const struct nh_object *o) { return o->klass == CKO_PRIVATE_KEY; }
static int is_public_key(const struct nh_object *o) { return o->klass == CKO_PUBLIC_KEY; }
static int is_key(const struct nh_object *o) { return is_secret(o) || is_private_key(o) || is_public_key(o); }

int nh_secret_length_ok(CK_ULONG key_type, CK_ULONG len) {
    if (key_type == CKK_AES) return len == 16 || len == 24 || len == 32;
    return len >= 1 && len <= NH_MAX_VALUE;
}

// Is the attribute defined for this object's class?
static int defined_for(const struct nh_object *o, CK_ATTRIBUTE_TYPE type) {
    switch (type) {
    case CKA_CLASS: case CKA_TOKEN: case CKA_PRIVATE: case CKA_MODIFIABLE: case CKA_LABEL:
        return 1;
    case CKA_APPLICATION:
        return o->klass == CKO_DATA;
    case CKA_VALUE:
        return o->klass == CKO_DATA || is_secret(o) || is_private_key(o);
    case CKA_KEY_TYPE: case CKA_ID: case CKA_LOCAL: case CKA_DERIVE:
        return is_key(o);
    case CKA_VALUE_LEN: case CKA_CHECK_VALUE:
        return is_secret(o);
    case CKA_SENSITIVE: case CKA_EXTRACTABLE: case CKA_ALWAYS_SENSITIVE: case CKA_NEVER_EXTRACTABLE:
    case CKA_ALWAYS_AUTHENTICATE: case CKA_SIGN: case CKA_DECRYPT: case CKA_UNWRAP:
        return is_secret(o) || is_private_key(o);
    case CKA_VERIFY: case CKA_ENCRYPT: case CKA_WRAP:
        return is_secret(o) || is_public_key(o);
    case CKA_EC_PARAMS:
        return is_private_key(o) || is_public_key(o);
    case CKA_EC_POINT: case CKA_ENCAPSULATE:
        return is_public_key(o);
    case CKA_DECAPSULATE:
        return is_private_key(o);
    default:
        return 0;
    }
}

static int is_bool_attribute(CK_ATTRIBUTE_TYPE type) {
    switch (type) {
    case CKA_TOKEN: case CKA_PRIVATE: case CKA_MODIFIABLE: case CKA_SENSITIVE: case CKA_EXTRACTABLE:
    case CKA_SIGN: case CKA_VERIFY: case CKA_ALWAYS_AUTHENTICATE: case CKA_LOCAL:
    case CKA_ALWAYS_SENSITIVE: case CKA_NEVER_EXTRACTABLE:
    case CKA_ENCRYPT: case CKA_DECRYPT: case CKA_WRAP: case CKA_UNWRAP: case CKA_DERIVE:
    case CKA_ENCAPSULATE: case CKA_DECAPSULATE:
        return 1;
    default:
        return 0;
    }
}

static uint8_t *bool_field(struct nh_object *o, CK_ATTRIBUTE_TYPE type) {
    switch (type) {
    case CKA_TOKEN: return &o->token;
    case CKA_PRIVATE: return &o->private_;
    case CKA_MODIFIABLE: return &o->modifiable;
    case CKA_SENSITIVE: return &o->sensitive;
    case CKA_EXTRACTABLE: return &o->extractable;
    case CKA_SIGN: return &o->sign;
    case CKA_VERIFY: return &o->verify;
    case CKA_ALWAYS_AUTHENTICATE: return &o->always_authenticate;
    case CKA_LOCAL: return &o->local;
    case CKA_ALWAYS_SENSITIVE: return &o->always_sensitive;
    case CKA_NEVER_EXTRACTABLE: return &o->never_extractable;
    case CKA_ENCRYPT: return &o->encrypt;
    case CKA_DECRYPT: return &o->decrypt;
    case CKA_WRAP: return &o->wrap;
    case CKA_UNWRAP: return &o->unwrap;
    case CKA_DERIVE: return &o->derive;
    case CKA_ENCAPSULATE: return &o->encapsulate;
    case CKA_DECAPSULATE: return &o->decapsulate;
    default: return NULL;
    }
}

static CK_ULONG read_ulong(const CK_ATTRIBUTE *a) {
    CK_ULONG v;
    memcpy(&v, a->pValue, sizeof v);
    return v;
}

static int check_value(const struct nh_object *o, uint8_t out[3]) {
    uint8_t block[32] = {0};
    if (o->key_type == CKK_AES) {
        if (nh_aes_blocks(1, o->value, o->value_len, NULL, block, NH_AES_BLOCK, block) != 0) return -1;
    } else {
        nh_sha256(o->value, o->value_len, block);
    }
    memcpy(out, block, 3);
    return 0;
}

CK_RV nh_attribute_read(const struct nh_object *o, CK_ATTRIBUTE_TYPE type, const void **value, CK_ULONG *len,
                        uint8_t scratch[sizeof(CK_ULONG)]) {
    if (!defined_for(o, type)) return CKR_ATTRIBUTE_TYPE_INVALID;
    if (is_bool_attribute(type)) {
        scratch[0] = *bool_field((struct nh_object *)o, type) ? CK_TRUE : CK_FALSE;
        *value = scratch;
        *len = sizeof(CK_BBOOL);
        return CKR_OK;
    }
    CK_ULONG number;
    switch (type) {
    case CKA_CLASS: number = (CK_ULONG)o->klass; break;
    case CKA_KEY_TYPE: number = (CK_ULONG)o->key_type; break;
    case CKA_VALUE_LEN: number = o->value_len; break;
    case CKA_LABEL: *value = o->label; *len = o->label_len; return CKR_OK;
    case CKA_ID: *value = o->ckaid; *len = o->ckaid_len; return CKR_OK;
    case CKA_APPLICATION: *value = o->application; *len = o->application_len; return CKR_OK;
    case CKA_EC_PARAMS: *value = o->ec_params; *len = o->ec_params_len; return CKR_OK;
    case CKA_EC_POINT: *value = o->ec_point; *len = o->ec_point_len; return CKR_OK;
    case CKA_CHECK_VALUE:
        if (check_value(o, scratch) != 0) return CKR_DEVICE_ERROR;
        *value = scratch;
        *len = 3;
        return CKR_OK;
    case CKA_VALUE:
        if (is_key(o) && (o->sensitive || !o->extractable)) return CKR_ATTRIBUTE_SENSITIVE;
        *value = o->value;
        *len = o->value_len;
        return CKR_OK;
    default:
        return CKR_ATTRIBUTE_TYPE_INVALID;
    }
    memcpy(scratch, &number, sizeof number);
    *value = scratch;
    *len = sizeof number;
    return CKR_OK;
}

CK_RV nh_template_check_pointers(CK_ATTRIBUTE_PTR tmpl, CK_ULONG count) {
    if (count > 0 && tmpl == NULL) return CKR_ARGUMENTS_BAD;
    for (CK_ULONG i = 0; i < count; i++)
        if (tmpl[i].pValue == NULL && tmpl[i].ulValueLen > 0) return CKR_ARGUMENTS_BAD;
    return CKR_OK;
}

// Does the template attribute hold exactly the object's current value?
static int same_as_current(const struct nh_object *o, const CK_ATTRIBUTE *a) {
    const void *value;
    CK_ULONG len;
    uint8_t scratch[sizeof(CK_ULONG)];
    if (nh_attribute_read(o, a->type, &value, &len, scratch) != CKR_OK) return 0;
    return len == a->ulValueLen && (len == 0 || memcmp(value, a->pValue, len) == 0);
}

static CK_RV set_bytes(uint8_t *field, uint32_t *field_len, size_t max, const CK_ATTRIBUTE *a) {
    if (a->ulValueLen > max) return CKR_ATTRIBUTE_VALUE_INVALID;
    if (a->ulValueLen > 0) memcpy(field, a->pValue, a->ulValueLen);
    *field_len = (uint32_t)a->ulValueLen;
    return CKR_OK;
}

static int key_type_known(CK_ULONG type) { return type == CKK_GENERIC_SECRET || type == CKK_AES || type == CKK_EC; }

static int key_type_fits(CK_ULONG klass, CK_ULONG type) {
    if (klass == CKO_SECRET_KEY) return type == CKK_GENERIC_SECRET || type == CKK_AES;
    return type == CKK_EC;  // private and public keys
}

// CKA_EC_PARAMS: the DER OID of P-256. Another well-formed OID is CKR_CURVE_NOT_SUPPORTED.
static CK_RV set_ec_params(struct nh_object *o, const CK_ATTRIBUTE *a) {
    const uint8_t *p = a->pValue;
    if (a->ulValueLen == sizeof nh_p256_oid && memcmp(p, nh_p256_oid, sizeof nh_p256_oid) == 0) {
        memcpy(o->ec_params, nh_p256_oid, sizeof nh_p256_oid);
        o->ec_params_len = sizeof nh_p256_oid;
        return CKR_OK;
    }
    if (a->ulValueLen >= 3 && p[0] == 0x06 && p[1] < 0x80 && p[1] + 2u == a->ulValueLen) return CKR_CURVE_NOT_SUPPORTED;
    return CKR_ATTRIBUTE_VALUE_INVALID;
}

// CKA_EC_POINT of a created public key: a DER OCTET STRING holding an uncompressed P-256 point.
static CK_RV set_ec_point(struct nh_object *o, const CK_ATTRIBUTE *a) {
    const uint8_t *p = a->pValue;
    if (a->ulValueLen != NH_EC_POINT_DER || p[0] != 0x04 || p[1] != NH_EC_POINT || !nh_ec_point_valid(p + 2))
        return CKR_ATTRIBUTE_VALUE_INVALID;
    memcpy(o->ec_point, p, NH_EC_POINT_DER);
    o->ec_point_len = NH_EC_POINT_DER;
    return CKR_OK;
}

// CKA_VALUE of a created EC private key: the scalar, big-endian, 1 to 32 bytes (kept as 32).
static CK_RV set_ec_scalar(struct nh_object *o, const CK_ATTRIBUTE *a) {
    if (a->ulValueLen < 1 || a->ulValueLen > NH_EC_SCALAR) return CKR_ATTRIBUTE_VALUE_INVALID;
    uint8_t scalar[NH_EC_SCALAR] = {0};
    memcpy(scalar + NH_EC_SCALAR - a->ulValueLen, a->pValue, a->ulValueLen);
    CK_RV rv = CKR_ATTRIBUTE_VALUE_INVALID;
    if (nh_ec_scalar_valid(scalar)) {
        memcpy(o->value, scalar, NH_EC_SCALAR);
        o->value_len = NH_EC_SCALAR;
        rv = CKR_OK;
    }
    explicit_bzero(scalar, sizeof scalar);
    return rv;
}

// Class and key type decide which attributes exist and what the defaults are.
static void set_defaults(struct nh_object *o, CK_ULONG klass, CK_ULONG key_type, enum nh_template_mode mode) {
    memset(o, 0, sizeof *o);
    o->klass = klass;
    o->modifiable = 1;
    if (klass == CKO_DATA) return;
    o->key_type = key_type;
    o->local = mode == NH_GENERATE;
    if (klass == CKO_PUBLIC_KEY) return;
    o->private_ = 1;
    o->extractable = 1;
    if (klass == CKO_PRIVATE_KEY) {
        o->sensitive = 1;
    } else if (key_type == CKK_AES) {
        o->encrypt = o->decrypt = o->wrap = o->unwrap = 1;
    } else {
        o->sign = o->verify = 1;
    }
}

CK_RV nh_template_apply(struct nh_object *o, CK_ATTRIBUTE_PTR tmpl, CK_ULONG count, enum nh_template_mode mode,
                        CK_ULONG klass, CK_ULONG key_type) {
    CK_RV rv = nh_template_check_pointers(tmpl, count);
    if (rv != CKR_OK) return rv;

    // The class and the key type first: they decide which attributes exist.
    if (mode != NH_COPY) {
        CK_ULONG chosen_class = klass;
        for (CK_ULONG i = 0; i < count; i++) {
            if (tmpl[i].type != CKA_CLASS) continue;
            if (tmpl[i].ulValueLen != sizeof(CK_ULONG)) return CKR_ATTRIBUTE_VALUE_INVALID;
            CK_ULONG v = read_ulong(&tmpl[i]);
            if (klass != NH_FROM_TEMPLATE && v != klass) return CKR_TEMPLATE_INCONSISTENT;
            if (chosen_class != NH_FROM_TEMPLATE && v != chosen_class) return CKR_TEMPLATE_INCONSISTENT;
            if (v != CKO_SECRET_KEY && v != CKO_PRIVATE_KEY && v != CKO_PUBLIC_KEY && v != CKO_DATA)
                return CKR_ATTRIBUTE_VALUE_INVALID;
            chosen_class = v;
        }
        if (chosen_class == NH_FROM_TEMPLATE) return CKR_TEMPLATE_INCOMPLETE;
        CK_ULONG chosen_type = NH_FROM_TEMPLATE;
        for (CK_ULONG i = 0; i < count && chosen_class != CKO_DATA; i++) {
            if (tmpl[i].type != CKA_KEY_TYPE) continue;
            if (tmpl[i].ulValueLen != sizeof(CK_ULONG)) return CKR_ATTRIBUTE_VALUE_INVALID;
            CK_ULONG v = read_ulong(&tmpl[i]);
            if (!key_type_known(v)) return mode == NH_CREATE ? CKR_ATTRIBUTE_VALUE_INVALID : CKR_TEMPLATE_INCONSISTENT;
            if (!key_type_fits(chosen_class, v)) return CKR_TEMPLATE_INCONSISTENT;
            if (key_type != NH_FROM_TEMPLATE && v != key_type) return CKR_TEMPLATE_INCONSISTENT;
            if (chosen_type != NH_FROM_TEMPLATE && v != chosen_type) return CKR_TEMPLATE_INCONSISTENT;
            chosen_type = v;
        }
        if (chosen_type == NH_FROM_TEMPLATE && chosen_class != CKO_DATA) {
            if (key_type != NH_FROM_TEMPLATE)
                chosen_type = key_type;
            else if (mode == NH_DERIVE || mode == NH_UNWRAP)
                chosen_type = CKK_GENERIC_SECRET;
            else
                return CKR_TEMPLATE_INCOMPLETE;  // C_CreateObject of a key without CKA_KEY_TYPE
        }
        set_defaults(o, chosen_class, chosen_type, mode);
    }

    int made_here = mode == NH_GENERATE || mode == NH_DERIVE || mode == NH_UNWRAP;  // the value comes from us
    int have_value = 0, have_value_len = 0, have_check = 0, have_ec_params = 0, have_ec_point = 0;
    uint8_t wanted_check[3] = {0};
    for (CK_ULONG i = 0; i < count; i++) {
        const CK_ATTRIBUTE *a = &tmpl[i];
        if (!defined_for(o, a->type)) return CKR_ATTRIBUTE_TYPE_INVALID;
        if (is_bool_attribute(a->type) && a->ulValueLen != sizeof(CK_BBOOL)) return CKR_ATTRIBUTE_VALUE_INVALID;
        if ((a->type == CKA_CLASS || a->type == CKA_KEY_TYPE || a->type == CKA_VALUE_LEN) &&
            a->ulValueLen != sizeof(CK_ULONG))
            return CKR_ATTRIBUTE_VALUE_INVALID;
        int on = is_bool_attribute(a->type) && *(const CK_BBOOL *)a->pValue != CK_FALSE;

        switch (a->type) {
        case CKA_CLASS: case CKA_KEY_TYPE:  // checked above, except for a copy
            if (mode == NH_COPY && !same_as_current(o, a)) return CKR_ATTRIBUTE_READ_ONLY;
            break;
        case CKA_TOKEN: case CKA_PRIVATE: case CKA_MODIFIABLE:
            *bool_field(o, a->type) = (uint8_t)on;
            break;
        case CKA_LABEL:
            if ((rv = set_bytes(o->label, &o->label_len, NH_MAX_SHORT, a)) != CKR_OK) return rv;
            break;
        case CKA_ID:
            if ((rv = set_bytes(o->ckaid, &o->ckaid_len, NH_MAX_SHORT, a)) != CKR_OK) return rv;
            break;
        case CKA_APPLICATION:
            if ((rv = set_bytes(o->application, &o->application_len, NH_MAX_SHORT, a)) != CKR_OK) return rv;
            break;
        case CKA_SENSITIVE:  // on a copy it may only be switched on
            if (mode == NH_COPY && o->sensitive && !on) return CKR_ATTRIBUTE_READ_ONLY;
            o->sensitive = (uint8_t)on;
            break;
        case CKA_EXTRACTABLE:  // on a copy it may only be switched off
            if (mode == NH_COPY && !o->extractable && on) return CKR_ATTRIBUTE_READ_ONLY;
            o->extractable = (uint8_t)on;
            break;
        case CKA_SIGN: case CKA_VERIFY: case CKA_ALWAYS_AUTHENTICATE:
        case CKA_ENCRYPT: case CKA_DECRYPT: case CKA_WRAP: case CKA_UNWRAP: case CKA_DERIVE:
        case CKA_ENCAPSULATE: case CKA_DECAPSULATE:
            if (mode == NH_COPY) {
                if (!same_as_current(o, a)) return CKR_ATTRIBUTE_READ_ONLY;
            } else {
                *bool_field(o, a->type) = (uint8_t)on;
            }
            break;
        case CKA_LOCAL: case CKA_ALWAYS_SENSITIVE: case CKA_NEVER_EXTRACTABLE:
            if (mode != NH_COPY || !same_as_current(o, a)) return CKR_ATTRIBUTE_READ_ONLY;
            break;
        case CKA_VALUE:
            if (made_here) return CKR_TEMPLATE_INCONSISTENT;
            if (mode == NH_COPY) {
                if (!same_as_current(o, a)) return CKR_ATTRIBUTE_READ_ONLY;
                break;
            }
            if (is_private_key(o)) {
                if ((rv = set_ec_scalar(o, a)) != CKR_OK) return rv;
            } else {
                if (is_secret(o) && !nh_secret_length_ok(o->key_type, a->ulValueLen)) return CKR_ATTRIBUTE_VALUE_INVALID;
                if ((rv = set_bytes(o->value, &o->value_len, NH_MAX_VALUE, a)) != CKR_OK) return rv;
            }
            have_value = 1;
            break;
        case CKA_VALUE_LEN:
            if (mode == NH_CREATE) return CKR_TEMPLATE_INCONSISTENT;
            if (mode == NH_COPY) {
                if (!same_as_current(o, a)) return CKR_ATTRIBUTE_READ_ONLY;
                break;
            }
            if (!nh_secret_length_ok(o->key_type, read_ulong(a))) return CKR_ATTRIBUTE_VALUE_INVALID;
            o->value_len = (uint32_t)read_ulong(a);
            have_value_len = 1;
            break;
        case CKA_CHECK_VALUE:
            if (mode == NH_CREATE) {
                if (a->ulValueLen != 3) return CKR_ATTRIBUTE_VALUE_INVALID;
                memcpy(wanted_check, a->pValue, 3);
                have_check = 1;
            } else if (made_here || !same_as_current(o, a)) {
                return CKR_ATTRIBUTE_READ_ONLY;
            }
            break;
        case CKA_EC_PARAMS:
            if (mode == NH_COPY) {
                if (!same_as_current(o, a)) return CKR_ATTRIBUTE_READ_ONLY;
                break;
            }
            if ((rv = set_ec_params(o, a)) != CKR_OK) return rv;
            have_ec_params = 1;
            break;
        case CKA_EC_POINT:
            if (mode == NH_COPY) {
                if (!same_as_current(o, a)) return CKR_ATTRIBUTE_READ_ONLY;
                break;
            }
            if (made_here) return CKR_TEMPLATE_INCONSISTENT;  // the key pair generation makes it
            if ((rv = set_ec_point(o, a)) != CKR_OK) return rv;
            have_ec_point = 1;
            break;
        default:
            return CKR_ATTRIBUTE_TYPE_INVALID;
        }
    }

    if (mode == NH_CREATE) {
        if (is_secret(o) || is_private_key(o)) {
            if (!have_value) return CKR_TEMPLATE_INCOMPLETE;
        }
        if ((is_private_key(o) || is_public_key(o)) && !have_ec_params) return CKR_TEMPLATE_INCOMPLETE;
        if (is_public_key(o) && !have_ec_point) return CKR_TEMPLATE_INCOMPLETE;
        if (have_check) {
            uint8_t actual[3];
            if (check_value(o, actual) != 0) return CKR_DEVICE_ERROR;
            if (memcmp(actual, wanted_check, 3) != 0) return CKR_ATTRIBUTE_VALUE_INVALID;
        }
        o->always_sensitive = 0;  // the value came from outside
        o->never_extractable = 0;
    } else if (mode == NH_GENERATE) {
        if (is_secret(o) && !have_value_len) return CKR_TEMPLATE_INCOMPLETE;
        if (is_public_key(o) && !have_ec_params) return CKR_TEMPLATE_INCOMPLETE;
        if (is_secret(o) || is_private_key(o)) {
            o->always_sensitive = o->sensitive;
            o->never_extractable = !o->extractable;
        }
    } else if (mode == NH_DERIVE || mode == NH_UNWRAP) {
        if (!have_value_len) o->value_len = 0;  // the mechanism decides
        o->always_sensitive = 0;  // derive: the caller applies the base key's rule
        o->never_extractable = 0;
    }
    return CKR_OK;
}

int nh_object_matches(const struct nh_object *o, CK_ATTRIBUTE_PTR tmpl, CK_ULONG count) {
    for (CK_ULONG i = 0; i < count; i++)
        if (!same_as_current(o, &tmpl[i])) return 0;
    return 1;
}

CK_RV nh_attributes_set(struct nh_object *o, CK_ATTRIBUTE_PTR tmpl, CK_ULONG count) {
    CK_RV rv = nh_template_check_pointers(tmpl, count);
    if (rv != CKR_OK) return rv;
    for (CK_ULONG i = 0; i < count; i++) {
        CK_ATTRIBUTE_TYPE type = tmpl[i].type;
        if (!defined_for(o, type)) return CKR_ATTRIBUTE_TYPE_INVALID;
        if (type != CKA_LABEL && type != CKA_ID) return CKR_ATTRIBUTE_READ_ONLY;
        if (!o->modifiable) return CKR_ATTRIBUTE_READ_ONLY;
        if (tmpl[i].ulValueLen > NH_MAX_SHORT) return CKR_ATTRIBUTE_VALUE_INVALID;
    }
    for (CK_ULONG i = 0; i < count; i++) {
        if (tmpl[i].type == CKA_LABEL)
            set_bytes(o->label, &o->label_len, NH_MAX_SHORT, &tmpl[i]);
        else
            set_bytes(o->ckaid, &o->ckaid_len, NH_MAX_SHORT, &tmpl[i]);
    }
    return CKR_OK;
}
