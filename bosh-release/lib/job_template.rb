# Renders a BOSH job's ERB templates the way the director does, without a director: properties with
# spec defaults, p/if_p, spec, link/if_link.
require 'erb'
require 'ostruct'
require 'yaml'

module JobTemplate
  class Error < StandardError; end

  # Mirrors BOSH's rule that a property's value comes from the manifest when set, else from the
  # job spec's default, and that undeclared properties do not exist for a template.
  class Properties
    def initialize(declared, given)
      @declared = declared
      @given = given
      reject_undeclared(given, [])
    end

    def lookup(name)
      raise Error, "property '#{name}' is not declared in the job spec" unless @declared.key?(name)

      value = dig(@given, name.split('.'))
      value.nil? ? @declared[name]&.fetch('default', nil) : value
    end

    private

    def dig(hash, keys)
      keys.reduce(hash) { |node, key| node.is_a?(Hash) ? node[key] : nil }
    end

    # Stricter than BOSH, which ignores them: a misspelt property in a manifest or a test should
    # fail rather than silently fall back to the default.
    def reject_undeclared(node, path)
      node.each do |key, value|
        name = (path + [key.to_s]).join('.')
        next if @declared.key?(name)
        unless value.is_a?(Hash) && @declared.keys.any? { |d| d.start_with?("#{name}.") }
          raise Error, "property '#{name}' is not declared in the job spec"
        end

        reject_undeclared(value, path + [key.to_s])
      end
    end
  end

  # What `if_p`/`if_link` return: runs the else branch only when the condition did not hold.
  class ElseBlock
    def initialize(taken)
      @taken = taken
    end

    def else
      yield unless @taken
      nil
    end
  end

  # A consumed link: properties the provider exposes, its instances and its BOSH DNS address.
  class Link
    attr_reader :instances, :address

    def initialize(name, link)
      @name = name
      @properties = link.fetch('properties', {})
      @instances = link.fetch('instances', []).map { |i| OpenStruct.new(i) }
      @address = link.fetch('address', "q-s0.#{name}.default.my-deployment.bosh")
    end

    def p(name, *default)
      value = name.split('.').reduce(@properties) { |node, key| node.is_a?(Hash) ? node[key] : nil }
      return value unless value.nil?
      return default.first unless default.empty?

      raise Error, "link '#{@name}' has no property '#{name}'"
    end
  end

  # The binding a template is evaluated in.
  class Context
    UNSET = Object.new.freeze

    attr_reader :spec

    def initialize(job_spec, properties, spec, links)
      @properties = Properties.new(job_spec.fetch('properties', {}) || {}, properties)
      @spec = to_struct(spec)
      @consumes = (job_spec['consumes'] || []).to_h { |c| [c['name'], c] }
      unknown = links.keys - @consumes.keys
      raise Error, "links #{unknown.join(', ')} are not consumed by #{job_spec['name']}" unless unknown.empty?

      @links = links.to_h { |name, link| [name, Link.new(name, link)] }
    end

    def p(names, default = UNSET)
      Array(names).each do |name|
        value = @properties.lookup(name)
        return value unless value.nil?
      end
      return default unless default.equal?(UNSET)

      raise Error, "Can't find property '#{Array(names).join("', '")}'"
    end

    def if_p(*names)
      values = names.map { |n| @properties.lookup(n) }
      taken = values.none?(&:nil?)
      yield(*values) if taken
      ElseBlock.new(taken)
    end

    def link(name)
      raise Error, "link '#{name}' is not declared under consumes" unless @consumes.key?(name)

      @links.fetch(name) { raise Error, "link '#{name}' was not provided" }
    end

    def if_link(name)
      raise Error, "link '#{name}' is not declared under consumes" unless @consumes.key?(name)

      taken = @links.key?(name)
      yield @links[name] if taken
      ElseBlock.new(taken)
    end

    def evaluate(source, path)
      erb = ERB.new(source, trim_mode: '-')
      erb.filename = path
      erb.result(binding)
    end

    private

    def to_struct(value)
      case value
      when Hash then OpenStruct.new(value.transform_values { |v| to_struct(v) })
      when Array then value.map { |v| to_struct(v) }
      else value
      end
    end
  end

  # One job directory: its spec and templates, looked up by the path they render to.
  class Job
    DEFAULT_SPEC = {
      'deployment' => 'my-deployment', 'name' => 'me', 'id' => 'a1b2c3d4', 'index' => 0,
      'az' => 'z1', 'bootstrap' => true, 'address' => 'me.default.my-deployment.bosh',
      'ip' => '10.0.0.10', 'persistent_disk' => 0,
      'networks' => { 'default' => { 'ip' => '10.0.0.10', 'default' => %w[dns gateway] } }
    }.freeze

    attr_reader :spec, :dir

    def initialize(dir)
      @dir = dir
      @spec = YAML.safe_load(File.read(File.join(dir, 'spec')))
    end

    def name
      spec.fetch('name')
    end

    def templates
      spec.fetch('templates', {})
    end

    def render(rendered_path, properties: {}, spec: {}, links: {})
      source = templates.key(rendered_path) or
        raise Error, "#{name} has no template rendering to #{rendered_path}"
      instance = DEFAULT_SPEC.merge('job' => { 'name' => name }).merge(spec)
      context = Context.new(self.spec, properties, instance, links)
      path = File.join(dir, 'templates', source)
      context.evaluate(File.read(path), path)
    end
  end
end
